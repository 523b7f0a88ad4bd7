"""The decisions store of ``orsgen review``: one Parquet part file per session.

``DIR/_review/decisions.parquet`` is a folder (the layout Spark and Arrow
call a Parquet dataset): every review session owns one part file named after
its start time, reviewer and a random token, so two reviewers on one folder
never write the same file. Each verdict rewrites the session's part in full
under a temp name, flushes it to disk and renames it over the old one, so
the part on disk always holds every verdict given so far and never a torn
row: closing the browser, or killing the server, loses nothing.
A part is closed after ``ROWS_PER_PART`` verdicts and the next one started,
so a save never rewrites more than that many rows.
``pyarrow.parquet.read_table(folder)`` and ``stages.screening.read_decisions``
read all parts as one table.
"""

from __future__ import annotations

import datetime as _dt
import os
import posixpath
import re
import secrets
import threading
from collections.abc import Callable

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
import pyarrow.parquet as pq

from orsgen.schemas.arrow import DECISION_SCHEMA, decision_to_row
from orsgen.schemas.records import ReviewDecision
from orsgen.stages.screening import decisions_path

#: Verdicts per part file: each save rewrites the current part, so this bounds its cost.
ROWS_PER_PART = 256
REVIEWER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class ReviewStoreError(ValueError):
    """The reviewer name or a decision is invalid, or the store cannot be written."""


def check_reviewer(name: str) -> str:
    """Returns ``name`` if it is a valid reviewer name (it becomes part of a file name).

    Raises:
        ReviewStoreError: not 1-64 characters of letters, digits, ``_ . @ -``.
    """
    if not REVIEWER_RE.match(name or "") or ".." in name:
        raise ReviewStoreError(
            f"reviewer name {name!r} is not allowed; use 1-64 letters, digits, '_', '.', '@' or '-' (e.g. --reviewer alice)."
        )
    return name


class DecisionLog:
    """The part file of one review session; thread-safe.

    Args:
        root: the dataset folder (``DIR``); decisions go to
            ``DIR/_review/decisions.parquet/part-<time>-<reviewer>-<token>-<seq>.parquet``,
            a new ``<seq>`` every ``ROWS_PER_PART`` verdicts.
        reviewer: the reviewer's name (``check_reviewer``).
        clock_ms: milliseconds since the epoch (tests pass a fake clock).
    """

    def __init__(self, root: str, reviewer: str, clock_ms: Callable[[], int] | None = None) -> None:
        self.reviewer = check_reviewer(reviewer)
        self._clock = clock_ms or (lambda: int(_dt.datetime.now(_dt.timezone.utc).timestamp() * 1000))
        self._fs, self.folder = fsspec.core.url_to_fs(decisions_path(root))
        stamp = _dt.datetime.fromtimestamp(self._clock() / 1000, tz=_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.prefix = f"part-{stamp}-{self.reviewer}-{secrets.token_hex(4)}"
        self._seq = 0
        self._rows: list[dict] = []
        self._n_before = 0  # verdicts in this session's earlier, full parts
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        """The part file the next verdict goes to."""
        return posixpath.join(self.folder, f"{self.prefix}-{self._seq:04d}.parquet")

    def add(self, sample_id: str, verdict: str, reason: str, *, split: str = "", kind: str = "", template: str = "") -> ReviewDecision:
        """Records one verdict and returns it once it is on disk."""
        with self._lock:
            if len(self._rows) >= ROWS_PER_PART:
                # A full part is final; a new one keeps each save small.
                self._n_before += len(self._rows)
                self._rows = []
                self._seq += 1
            d = ReviewDecision(sample_id, verdict, reason, self.reviewer, self._clock(), split, kind, template)
            rows = self._rows + [decision_to_row(d)]
            self._write(rows)
            self._rows = rows
            return d

    def __len__(self) -> int:
        return self._n_before + len(self._rows)

    def _write(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=DECISION_SCHEMA)
        fs = self._fs
        fs.makedirs(self.folder, exist_ok=True)
        # "." hides the temp file from every reader (Arrow skips "." and "_" names).
        tmp = posixpath.join(self.folder, f".{posixpath.basename(self.path)}.tmp")
        local = isinstance(fs, LocalFileSystem)
        try:
            with fs.open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                if local:
                    f.flush()
                    os.fsync(f.fileno())
            if local:
                os.replace(tmp, self.path)
            else:
                fs.mv(tmp, self.path)
        except OSError as err:
            raise ReviewStoreError(
                f"could not save the decision to {self.path} ({err}); check that the folder is writable. "
                "Earlier decisions of this session are safe in that file."
            ) from None
