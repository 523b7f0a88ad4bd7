"""Image byte checks shared by every reader: size caps, decoding, hashing.

Readers call ``check_image`` before an image enters the pipeline, so a corrupt
or hostile file becomes a reject with a reason code instead of a crash later.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from orsgen.schemas.config import ImageConfig


#: The ``corrupt_image`` message for bytes in no format Pillow reads.
UNIDENTIFIED_IMAGE_MESSAGE = (
    "the image cannot be decoded: cannot identify image file (its bytes match no image format Pillow reads)."
)


class ImageError(ValueError):
    """An image failed a check; ``reason`` is the reject reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``check_image`` learnt about an image.

    Attributes:
        width: pixels.
        height: pixels.
        format: PIL format name (``JPEG``, ``PNG``...).
        sha256: hex digest of the encoded bytes.
    """

    width: int
    height: int
    format: str
    sha256: str


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


#: Frame markers whose decoding Pillow's draft mode handles: Huffman-coded
#: baseline, extended sequential and progressive DCT.
_DRAFT_FRAMES = frozenset((0xC0, 0xC1, 0xC2))
#: Segments allowed before that frame marker: APPn, COM, DQT, DHT, DRI.
_HEADER_SEGMENTS = frozenset((*range(0xE0, 0xF0), 0xFE, 0xDB, 0xC4, 0xDD))


def draft_decodable(data: bytes) -> bool:
    """True when a JPEG's first frame is a Huffman-coded DCT frame (SOF0, SOF1, SOF2).

    Pillow's draft mode tells libjpeg to scale the output and sizes its own
    buffers for the scaled image; libjpeg does not scale a lossless frame
    (SOF3), so a drafted lossless JPEG overruns the buffer (a heap overflow,
    seen as a segfault with Pillow 12 / libjpeg-turbo 3.1). This walks the
    marker segments by their lengths exactly as libjpeg reads them and answers
    True only for a clean header (SOI, then only APPn / COM / DQT / DHT / DRI
    segments) that reaches one of the three frame markers; anything else
    (another frame type, fill bytes, stray data, a truncated header) is False.
    """
    if data[:2] != b"\xff\xd8":
        return False
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker in _DRAFT_FRAMES:
            return True
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker not in _HEADER_SEGMENTS or length < 2:
            return False
        pos += 2 + length
    return False


def _full_decode(data: bytes, img: Image.Image, fmt: str, width: int, height: int) -> None:
    """Decodes every byte of the image's pixel data; raises what ``img.load()`` raises.

    A Huffman-coded DCT JPEG (``draft_decodable``; lossless and arithmetic-coded
    frames are not) is decoded in draft mode first: libjpeg still reads and
    entropy-decodes every scan and every coefficient of the stream (the same
    bytes, in the same order, with the same errors); only the inverse DCT, the
    upsampling and the colour conversion run at 1/8 scale, which halves the
    cost. Only when that decode raises is the file decoded again at full size,
    so a refused file is refused by, and with the message of, the plain full
    decode, exactly as before; a file the full decode refuses is never accepted
    by the draft one (tests/test_ingest_fast.py fuzzes truncated, flipped and
    spliced JPEGs against the plain decode).
    """
    if fmt != "JPEG" or not draft_decodable(data):
        img.load()
        return
    try:
        img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        img.load()
    except Exception:
        # Whatever the draft decode raised, the verdict and the message are the
        # full decode's (which may also raise nothing: then the file is fine).
        Image.open(io.BytesIO(data)).load()


def check_image(
    data: bytes,
    cfg: ImageConfig,
    expect_wh: tuple[int, int] | None = None,
) -> ImageInfo:
    """Checks encoded image bytes without trusting them.

    The header is read first and the pixel count capped *before* decoding, so
    a decompression bomb is refused without allocating it. With
    ``cfg.verify == "full"`` the image is then fully decoded, which catches
    truncated and corrupt files.

    Args:
        data: encoded image bytes.
        cfg: limits (``max_bytes``, ``max_pixels``, ``verify``).
        expect_wh: ``(width, height)`` the annotations claim, if any.

    Returns:
        The image's size, format and sha256.

    Raises:
        ImageError: reasons ``empty_image``, ``image_too_large``,
            ``corrupt_image``, ``image_size_mismatch``.
    """
    if not data:
        raise ImageError("empty_image", "the image file is empty.")
    if len(data) > cfg.max_bytes:
        raise ImageError(
            "image_too_large",
            f"the image is {len(data)} bytes, above image.max_bytes={cfg.max_bytes}; raise the limit if this is expected.",
        )
    try:
        with warnings.catch_warnings():
            # PIL warns (then errors) on bombs by its own global limit; ours is
            # checked explicitly below with a clearer reason.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            fmt = img.format or ""
            if width <= 0 or height <= 0:
                raise ImageError("corrupt_image", f"the image header claims a size of {width}x{height}.")
            if width * height > cfg.max_pixels:
                raise ImageError(
                    "image_too_large",
                    f"the image is {width}x{height} = {width * height} px, above image.max_pixels={cfg.max_pixels}.",
                )
            if cfg.verify == "full":
                _full_decode(data, img, fmt, width, height)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        # Pillow's own guard fires inside Image.open(), before the header can
        # reach the cap above, for claims over 2 * Image.MAX_IMAGE_PIXELS. It is
        # left in place (not disabled process-wide), so the same bytes get the
        # same reason on every worker, whatever that worker decoded before.
        raise ImageError(
            "image_too_large",
            f"the image header claims more pixels than Pillow opens ({err}); "
            "image.max_pixels cannot raise Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS).",
        ) from None
    except UnidentifiedImageError:
        # Pillow's message names the stream by its repr, a memory address, which
        # would make this reject's message differ from run to run.
        raise ImageError("corrupt_image", UNIDENTIFIED_IMAGE_MESSAGE) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("corrupt_image", f"the image cannot be decoded: {err}") from None
    if expect_wh is not None and (int(expect_wh[0]), int(expect_wh[1])) != (width, height):
        raise ImageError(
            "image_size_mismatch",
            f"the image is {width}x{height} px but its annotations say {expect_wh[0]}x{expect_wh[1]}.",
        )
    return ImageInfo(width=width, height=height, format=fmt, sha256=sha256_hex(data))
