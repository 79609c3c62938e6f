"""The errors the image store raises; the containerizer catches ImageError and fails the container with its text."""

from __future__ import annotations


class ImageError(Exception):
    """Any failure to resolve, read, verify or store an image. The message is what the user sees."""


class InvalidReference(ImageError):
    """The image reference in a manifest does not parse (a permanent error until the spec changes)."""


class ImageNotFound(ImageError):
    """No archive in --docker_registry holds the image (Mesos: "Failed to find archive for image ...")."""


class ArchiveError(ImageError):
    """The archive is corrupt: unreadable tar, bad JSON, a manifest that does not fit its format."""


class DigestMismatch(ImageError):
    """A blob's content does not match its digest, or the pinned digest is not what the archive holds."""


class UnsafeArchive(ImageError):
    """A layer tries to write outside its rootfs or holds something the store refuses (devices, oversize)."""

