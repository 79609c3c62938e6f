"""The errors the image store raises: temporary (the launch is tried again with backoff, the container
Failed with reason ProvisioningFailed meanwhile) except an invalid reference, which waits for the spec."""

from __future__ import annotations

from reconciler.errors import PermanentError, TemporaryError


class ImageError(TemporaryError):
    """Any failure to resolve, read, verify or store an image. The message is what the user sees."""

    reason = "ProvisioningFailed"
    shows_failed = True


class InvalidReference(ImageError, PermanentError):
    """The image reference in a manifest does not parse (a permanent error until the spec changes)."""


class ImageNotFound(ImageError):
    """No archive in --docker_registry holds the image (Mesos: "Failed to find archive for image ...")."""


class ArchiveError(ImageError):
    """The archive is corrupt: unreadable tar, bad JSON, a manifest that does not fit its format."""


class DigestMismatch(ImageError):
    """A blob's content does not match its digest, or the pinned digest is not what the archive holds."""


class UnsafeArchive(ImageError):
    """A layer tries to write outside its rootfs or holds something the store refuses (devices, oversize)."""

