"""stages.ingest.images.check_image: the size caps, decoding and reason codes every reader relies on."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from orsgen.schemas.config import ImageConfig
from orsgen.stages.ingest.images import ImageError, check_image, sha256_hex


def _jpeg(w: int = 20, h: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims ``w`` x ``h`` pixels but holds almost no data (a bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _reason(data: bytes, cfg: ImageConfig, **kw) -> str:
    with pytest.raises(ImageError) as err:
        check_image(data, cfg, **kw)
    assert str(err.value)  # a sentence, not just a code
    return err.value.reason


def test_valid_image_info():
    data = _jpeg()
    info = check_image(data, ImageConfig(), expect_wh=(20, 16))
    assert (info.width, info.height, info.format, info.sha256) == (20, 16, "JPEG", sha256_hex(data))


def test_each_problem_has_its_reason():
    good = _jpeg()
    assert _reason(b"", ImageConfig()) == "empty_image"
    assert _reason(good, ImageConfig(max_bytes=100)) == "image_too_large"
    assert _reason(good, ImageConfig(max_pixels=20 * 16 - 1)) == "image_too_large"
    assert _reason(b"not an image at all", ImageConfig()) == "corrupt_image"
    assert _reason(good, ImageConfig(), expect_wh=(16, 20)) == "image_size_mismatch"
    big = _jpeg(200, 160)
    truncated = big[: len(big) * 3 // 4]  # the header survives, the scan data is cut
    assert _reason(truncated, ImageConfig(verify="full")) == "corrupt_image"
    # verify=header parses the header only: faster, and it misses the truncation.
    assert check_image(truncated, ImageConfig(verify="header")).width == 200


@pytest.mark.parametrize("wh", [(30_000, 30_000), (9_000, 9_000)])  # above / below Pillow's own bomb error
def test_pixel_bomb_is_refused_before_decoding_with_the_same_reason_every_time(wh):
    bomb = _png_header_only(*wh)
    limit = Image.MAX_IMAGE_PIXELS
    first = _reason(bomb, ImageConfig())
    # A full decode in between must not change the verdict on the same bytes
    # (workers decode different images before meeting this one).
    check_image(_jpeg(), ImageConfig(verify="full"))
    assert _reason(bomb, ImageConfig()) == first == "image_too_large"
    assert Image.MAX_IMAGE_PIXELS == limit, "check_image must not change Pillow's global limit"
