"""Container images from a local registry directory: references, archives, safe layer extraction and the
content-addressed store that provisions container root filesystems (Mesos provisioner/docker)."""

from reconciler.images.errors import (
                                      ArchiveError,
                                      DigestMismatch,
                                      ImageError,
                                      ImageNotFound,
                                      InvalidReference,
                                      UnsafeArchive,
)
from reconciler.images.extract import DEFAULT_MAX_LAYER_BYTES
from reconciler.images.listing import image_doc, images_table
from reconciler.images.reference import ImageReference, parse_reference
from reconciler.images.store import (
                                      DEFAULT_MAX_IMAGE_BYTES,
                                      IMAGE_RECORD,
                                      ImageStore,
                                      PulledImage,
                                      StoredImage,
                                      layers_in_use,
)

__all__ = [
    "ArchiveError", "DigestMismatch", "ImageError", "ImageNotFound", "InvalidReference", "UnsafeArchive",
    "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_LAYER_BYTES", "ImageReference", "parse_reference", "IMAGE_RECORD",
    "ImageStore", "PulledImage", "StoredImage", "layers_in_use", "image_doc", "images_table",
]
