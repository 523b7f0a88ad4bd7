"""Config of the ingest stage: input sources and image reading limits."""

from __future__ import annotations

from typing import Annotated, Literal

from orsgen.schemas.config.base import ConfigModel
from pydantic import Field


class Sa1bInput(ConfigModel):
    """SA-1B tar shards (``sa_000000.tar`` with ``sa_<id>.jpg`` + ``sa_<id>.json``).

    Attributes:
        name: unique name of this input; prefixes output keys.
        shards: fsspec URLs or globs of tar shards (local, gs://, s3://, hf://).
        max_images: stop after this many images per shard (None: all).
    """

    type: Literal["sa1b"] = "sa1b"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    shards: list[str] = Field(min_length=1)
    max_images: int | None = Field(default=None, ge=1)


class CocoInput(ConfigModel):
    """COCO instances JSON plus an image folder or URL prefix.

    Attributes:
        name: unique name of this input.
        annotations: path or URL of ``instances_*.json``.
        images: folder or URL prefix that ``file_name`` is joined to.
        max_images: read at most this many images (None: all).
    """

    type: Literal["coco"] = "coco"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    annotations: str
    images: str
    max_images: int | None = Field(default=None, ge=1)


class RefcocoInput(ConfigModel):
    """RefCOCO / RefCOCO+ / RefCOCOg ``refs(<splitBy>).p`` with its instances.

    Attributes:
        name: unique name of this input.
        refs: path of the refs pickle (read with a restricted unpickler) or a
            JSON list of the same refs.
        instances: the COCO ``instances.json`` the refs point into.
        images: folder or URL prefix of the COCO train2014 images.
        dataset: dataset tag stored on refs, e.g. ``refcoco_unc``.
        splits: keep only refs of these source splits (None: all).
        max_images: read at most this many images (None: all).
    """

    type: Literal["refcoco"] = "refcoco"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    refs: str
    instances: str
    images: str
    dataset: str = "refcoco_unc"
    splits: list[str] | None = None
    max_images: int | None = Field(default=None, ge=1)


class GrefcocoInput(ConfigModel):
    """gRefCOCO ``grefs(unc)`` as ``.p`` or ``.json``: multi-target and no-target refs.

    Attributes:
        name: unique name of this input.
        refs: path of ``grefs(unc).json`` or the ``.p`` pickle (read with a
            restricted unpickler); ``ann_id`` is a list, ``[-1]`` means no target.
        instances: the COCO ``instances.json`` the refs point into.
        images: folder or URL prefix of the COCO train2014 images.
        dataset: dataset tag stored on refs.
        splits: keep only refs of these source splits (None: all).
        max_images: read at most this many images (None: all).
    """

    type: Literal["grefcoco"] = "grefcoco"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    refs: str
    instances: str
    images: str
    dataset: str = "grefcoco_unc"
    splits: list[str] | None = None
    max_images: int | None = Field(default=None, ge=1)


InputConfig = Annotated[Sa1bInput | CocoInput | RefcocoInput | GrefcocoInput, Field(discriminator="type")]


class ImageConfig(ConfigModel):
    """Image reading limits.

    Attributes:
        max_pixels: refuse images whose header claims more pixels than this
            (decompression-bomb guard); the image becomes a reject.
        max_bytes: refuse encoded images larger than this many bytes.
        verify: ``full`` decodes every image to catch truncated/corrupt data;
            ``header`` only parses the header (faster, catches less).
    """

    max_pixels: int = Field(default=64_000_000, ge=1)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    verify: Literal["full", "header"] = "full"
