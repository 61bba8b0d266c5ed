"""OCI images: references, registry pulls, ``docker save`` / OCI-layout import, and the
content-addressed store under ``$SM_HOME`` (layers become root filesystems in ``rootfs``)."""

from vmm.images.errors import ImageError

__all__ = ["ImageError"]
