"""The ingest path's shortcuts give what the direct computation gives.

Each shortcut in ``stages.ingest`` (and the COCO segmentation helpers of
``stages.common.masks``) is checked here against the plain computation it
replaces, on inputs chosen to hit its edges.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from orsgen.stages.ingest import coco as ic


# ---------------------------------------------------------------- reading image bytes


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 4096])
@pytest.mark.parametrize("cap", [0, 1, 9, 10, 11, 5000])
def test_local_read_equals_fsspec_read(tmp_path: Path, size: int, cap: int) -> None:
    path = tmp_path / "img.bin"
    path.write_bytes(bytes(i % 251 for i in range(size)))
    with fsspec.open(str(path), "rb") as f:
        expected = f.read(cap + 1)
    assert ic._read_image(str(path), cap) == expected


def test_local_read_does_not_trust_the_size_hint() -> None:
    # A pipe reports st_size 0: the read must go on to the cap, not stop at the hint.
    payload = bytes(range(256)) * 40
    r, w = os.pipe()
    os.write(w, payload)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert ic._read_capped(f, 5000) == payload[:5001]


def test_local_read_errors_are_the_ones_load_task_maps(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ic._read_image(str(tmp_path / "missing.jpg"), 10)
    with pytest.raises(IsADirectoryError):
        ic._read_image(str(tmp_path), 10)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        ic._read_image(str(tmp_path / "file" / "x.jpg"), 10)
