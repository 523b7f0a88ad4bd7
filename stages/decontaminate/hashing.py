"""Image identities: sha256 of the bytes and a 256-bit perceptual hash.

The perceptual hash is imagehash's pHash with ``hash_size=16``: the grey image
resized to 64x64, its 2-D DCT, and the sign of the 16x16 lowest frequencies
against their median, 256 bits. It survives re-encoding and resizing almost
unchanged (a few bits). A crop shifts every frequency, so the benchmark side
also stores the pHash of its image with ``crop_frac`` cut off each side; a
copy cropped by about that much on one side lands within a few bits of one
of them (measured in ``benchmarks/bench_decontaminate.py``).

Images are decoded once, reduced with the JPEG decoder's own scaling
(``draft``) and a box filter to at most ``WORK_PX`` on the long side before
hashing: the 64x64 resize inside pHash sees the same picture, at a fraction
of the decoding cost of a 1500x2250 SA-1B photo.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from orsgen.stages.ingest.images import draft_decodable

#: Bits of the perceptual hash and bytes of its packed form.
HASH_BITS = 256
HASH_BYTES = HASH_BITS // 8
#: Name stored in index files: a file made with another hash is refused.
HASH_NAME = "imagehash.phash16"
#: Long side, in pixels, the image is reduced to before hashing.
WORK_PX = 512
#: Names of the crop variants, in the order ``image_hashes`` returns them.
CROP_SIDES = ("left", "right", "top", "bottom")


class HashError(ValueError):
    """The image bytes could not be decoded for hashing."""


def _imagehash():
    try:
        import imagehash
    except ImportError as err:  # pragma: no cover - the dedup extra is in dev
        raise ImportError(
            "decontamination needs the imagehash library; install orsgen with the dedup extra: pip install 'orsgen[dedup]'."
        ) from err
    return imagehash


@dataclass(frozen=True, slots=True)
class ImageHashes:
    """The identities of one image.

    Attributes:
        sha256: hex digest of the encoded bytes.
        phash: the 256-bit pHash, packed (32 bytes).
        crops: the pHashes of the image with ``crop_frac`` cut off the left,
            right, top and bottom side (``CROP_SIDES``); empty if not asked.
    """

    sha256: str
    phash: bytes
    crops: tuple[bytes, ...] = ()

    @property
    def all(self) -> tuple[bytes, ...]:
        """The pHash and its crop variants."""
        return (self.phash, *self.crops)


def decode_grey(data: bytes) -> Image.Image:
    """Decodes image bytes to a grey PIL image at most ``WORK_PX`` on the long side.

    Raises:
        HashError: the bytes are not a decodable image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: ingest already capped the size
            im = Image.open(io.BytesIO(data))
            # Pillow's draft mode overruns its buffer on a lossless JPEG (a
            # crash, not an error): only Huffman-coded DCT frames are drafted.
            if draft_decodable(data):
                im.draft("L", (WORK_PX, WORK_PX))
            im = im.convert("L")
    except UnidentifiedImageError:
        # Pillow's message names the stream by its repr (a memory address).
        raise HashError("the image cannot be decoded for hashing: its bytes match no image format Pillow reads.") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise HashError(f"the image cannot be decoded for hashing: {err}") from None
    if max(im.size) > WORK_PX:
        scale = WORK_PX / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BOX)
    return im


def phash_bytes(im: Image.Image) -> bytes:
    """The packed 256-bit pHash of a PIL image."""
    bits = _imagehash().phash(im, hash_size=16).hash
    return np.packbits(np.asarray(bits, dtype=bool).ravel()).tobytes()


def crop_boxes(width: int, height: int, crop_frac: float) -> list[tuple[int, int, int, int]]:
    """PIL boxes cutting ``crop_frac`` off the left, right, top and bottom side."""
    dx = max(1, round(crop_frac * width))
    dy = max(1, round(crop_frac * height))
    return [(dx, 0, width, height), (0, 0, width - dx, height), (0, dy, width, height), (0, 0, width, height - dy)]


def image_hashes(data: bytes, crop_frac: float = 0.0, sha256: str | None = None) -> ImageHashes:
    """Hashes one encoded image: decoded once, then hashed whole and cropped.

    Args:
        data: encoded image bytes (JPEG, PNG, WebP...).
        crop_frac: when > 0, also hash the image with this fraction cut off
            each side (``CROP_SIDES`` order).
        sha256: the bytes' digest when already known (ingest computed it).

    Returns:
        The image's ``ImageHashes``.

    Raises:
        HashError: the bytes are not a decodable image.
    """
    import hashlib

    im = decode_grey(data)
    crops: tuple[bytes, ...] = ()
    if crop_frac > 0 and min(im.size) >= 8:
        crops = tuple(phash_bytes(im.crop(box)) for box in crop_boxes(im.width, im.height, crop_frac))
    return ImageHashes(sha256 or hashlib.sha256(data).hexdigest(), phash_bytes(im), crops)


def parse_hex_hash(text: str) -> bytes:
    """A 64-hex-digit pHash as 32 bytes.

    Raises:
        ValueError: not 64 hex digits.
    """
    text = text.strip().lower()
    if len(text) != 2 * HASH_BYTES or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"a pHash is 64 hex digits, got {text[:80]!r}.")
    return bytes.fromhex(text)
