"""Bounded-memory groups for the writers: spill to worker-local disk, read back in key order.

A write group (one ``(split, bucket)`` of examples, or one bucket of rejects)
can be far larger than a worker's memory: a full-SA-1B bucket with a fixed
bucket count is hundreds of GB. The writers therefore never hold a group:

* ``SpilledGroup`` (examples): records are kept in memory up to a byte
  budget. When it is reached, the held records go to one worker-local
  temporary file as a run sorted by key, and from then on every record is
  appended to that file as it arrives, in arrival order, and never held.
  Appending at once writes the bytes while they are still in the CPU cache,
  and lets the producer's memory be reused; holding and dropping runs of
  records cost more CPU than the spill write itself (measured with
  ``benchmarks/bench_write_memory.py``: fresh pages for every record, and a
  second pass over cold memory). Only a small ``SpillEntry`` per record
  (key, counts, sizes: about 0.55 KB) stays in memory, so the writer can
  dedupe, sort and plan parts from the entries, then read each record back
  by offset (one ``preadv`` into a reused buffer) while it streams a shard.
  Reading back in key order is a random read per record, which costs
  nothing extra while the page cache holds the spill file and is a
  whole-record read (several MB for SA-1B) when it does not. Peak memory:
  the budget, the entries, and one Parquet row group.
* ``SortedSpill`` (rejects, which are small but can number in the hundreds
  of millions): an external merge sort. Items are buffered up to the budget,
  sorted, written as a run, and the runs are merged lazily
  (``heapq.merge``); memory is the budget plus one chunk per run.

Spill files are ``tempfile.TemporaryFile`` objects: unlinked when created, so
a crashed or killed worker leaves nothing behind. They hold only bytes this
process wrote itself moments before (pickle is safe here: nothing read from
outside is unpickled). Whether a group spilled or not never changes the
output: both paths give the same records in the same order.
"""

from __future__ import annotations

import heapq
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Generic, TypeVar

from orsgen.stages.write.plan import EncodedExample

#: Default in-memory budget of one writer before it spills (``write.spill_memory_max_bytes``).
DEFAULT_SPILL_MEMORY_MAX_BYTES = 256 * 1024 * 1024
# Items per pickled chunk of a sorted run: memory during the merge is one
# chunk per run, and pickling a list is much faster than one item at a time.
_RUN_CHUNK_ITEMS = 1024


def _temp_file(spill_dir: str | None) -> IO[bytes]:
    if spill_dir is not None:
        os.makedirs(spill_dir, exist_ok=True)
    # Unlinked at once on POSIX: nothing is left behind after a crash.
    # Unbuffered: ``SpilledGroup`` writes through the descriptor
    # (``os.writev``); ``SortedSpill`` writes whole pickled chunks.
    return tempfile.TemporaryFile(dir=spill_dir, prefix="orsgen-spill-", buffering=0)


def _write_all(fd: int, parts: Iterable[bytes | memoryview], spill_dir: str | None) -> int:
    """Writes ``parts`` one after the other at ``fd``'s position (``writev``); returns the bytes written."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(v.nbytes for v in views)
    while views:
        n = os.writev(fd, views)
        if n == 0:
            raise OSError(f"could not write to the spill file in {spill_dir or '$TMPDIR'}; is the disk full?")
        # A short write (a signal, a nearly full disk): go on after what went out.
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views:
            views[0] = views[0][n:]
    return total


@dataclass(frozen=True, slots=True)
class SpillEntry:
    """What the writer keeps in memory of one record of a spilled group.

    Everything ``plan``, ``dedupe_by_key`` and the shard stats need, without
    the image and JSON bytes. ``index`` is the record's arrival index
    in its ``SpilledGroup`` (``SpilledGroup.get`` reads the record back).
    """

    index: int
    key: str
    split: str
    size: int
    n_image: int
    n_json: int
    n_instances: int
    n_refs: int
    n_samples: int
    samples_by_kind: tuple[tuple[str, int], ...]
    image_id: str
    uri: str
    sha256: str


class SpilledGroup:
    """One group's ``EncodedExample`` records: in memory up to a budget, then on disk.

    Use as a context manager (``close`` drops the spill file)::

        with SpilledGroup(memory_max_bytes=256 << 20) as group:
            for enc in examples:
                group.add(enc)
            group.seal()
            for entry in sorted(group.entries, key=lambda e: e.key):
                enc = group.get(entry)

    Args:
        memory_max_bytes: records are held in memory while their bytes stay
            within this budget; the record that would pass it moves the held
            records to the spill file as one run sorted by key, and that
            record and every later one are appended to the file as they
            arrive. 0 spills every record.
        spill_dir: folder of the spill file (None: ``$TMPDIR``).
    """

    def __init__(self, memory_max_bytes: int = DEFAULT_SPILL_MEMORY_MAX_BYTES, spill_dir: str | None = None) -> None:
        self._budget = memory_max_bytes
        self._spill_dir = spill_dir
        self.entries: list[SpillEntry] = []
        self._held: dict[int, EncodedExample] = {}
        self._held_bytes = 0
        self._offsets: list[int] = []  # -1: held in memory
        self._file: IO[bytes] | None = None
        self._fd = -1
        self._end = 0

    @property
    def spilled(self) -> bool:
        """True once the group went to disk."""
        return self._file is not None

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, enc: EncodedExample) -> SpillEntry:
        """Adds one record (arrival order is kept) and returns its entry."""
        i = len(self.entries)
        entry = SpillEntry(
            index=i,
            key=enc.key,
            split=enc.split,
            size=enc.size,
            n_image=len(enc.image),
            n_json=len(enc.json),
            n_instances=enc.n_instances,
            n_refs=enc.n_refs,
            n_samples=enc.n_samples,
            samples_by_kind=enc.samples_by_kind,
            image_id=enc.image_id,
            uri=enc.uri,
            sha256=enc.sha256,
        )
        self.entries.append(entry)
        n = entry.n_image + entry.n_json
        if self._file is None and self._held and self._held_bytes + n > self._budget:
            self._write_run()
        if self._file is not None:
            # Spilled: straight to disk while the bytes are hot, never held.
            self._offsets.append(self._append(enc))
        else:
            self._offsets.append(-1)
            self._held[i] = enc
            self._held_bytes += n
        return entry

    def _write_run(self) -> None:
        """Writes the held records, sorted by key, as one run of the spill file."""
        if self._file is None:
            self._file = _temp_file(self._spill_dir)
            self._fd = self._file.fileno()
        for j in sorted(self._held, key=lambda j: (self.entries[j].key, j)):
            self._offsets[j] = self._append(self._held[j])
        self._held.clear()
        self._held_bytes = 0

    def seal(self) -> None:
        """Call after the last ``add``: nothing of a spilled group is then held in memory.

        (Since records arriving after the first spill are written at once,
        this only matters to a group that spilled and still holds records,
        which ``add`` never leaves; it is kept as the documented last step.)
        """
        if self._file is not None and self._held:
            self._write_run()

    def _append(self, enc: EncodedExample) -> int:
        """Appends one record's image and JSON bytes with one system call; returns its offset."""
        offset = self._end
        self._end += _write_all(self._fd, (enc.image, enc.json), self._spill_dir)
        return offset

    def get(self, entry: SpillEntry) -> EncodedExample:
        """Returns the full record of ``entry`` (read back from disk if spilled)."""
        held = self._held.get(entry.index)
        if held is not None:
            return held
        offset = self._offsets[entry.index]
        # One read per member: each lands in its own bytes object, with no
        # second copy to cut a combined buffer apart.
        parts = []
        for n in (entry.n_image, entry.n_json):
            data = os.pread(self._fd, n, offset) if n else b""
            if len(data) != n:
                raise OSError(
                    f"spill file ended early: read {len(data)} of {n} bytes at offset {offset}; is the disk full?"
                )
            parts.append(data)
            offset += n
        image, json_bytes = parts
        return EncodedExample(
            key=entry.key,
            split=entry.split,
            image=image,
            json=json_bytes,
            n_instances=entry.n_instances,
            n_refs=entry.n_refs,
            n_samples=entry.n_samples,
            samples_by_kind=entry.samples_by_kind,
            size=entry.size,
            image_id=entry.image_id,
            uri=entry.uri,
            sha256=entry.sha256,
        )

    def tar_members(
        self, entries: Iterable[SpillEntry], *, reuse_buffer: bool = True
    ) -> Iterator[tuple[str, bytes | memoryview, bytes | memoryview]]:
        """Yields ``(key, image, json)`` of each entry, in the given order, for streaming.

        With ``reuse_buffer``, a spilled record is read into one reused
        buffer (no allocation per record): each yielded view is valid only
        until the next one is requested, which is all a writer that writes
        it out before asking for the next needs (``write`` must not keep its
        argument, as Python's I/O contract says). Without it, each record
        is read into a fresh ``bytes`` object, which a writer may keep (a
        hashing writer then hashes it on its helper thread while the next
        record is read and written).
        """
        buf = bytearray()
        for entry in entries:
            held = self._held.get(entry.index)
            if held is not None:
                yield entry.key, held.image, held.json
                continue
            n = entry.n_image + entry.n_json
            offset = self._offsets[entry.index]
            if reuse_buffer:
                if len(buf) < n:
                    buf = bytearray(max(n, 2 * len(buf)))
                view = memoryview(buf)[:n]
                got = os.preadv(self._fd, [view], offset)
            else:
                view = memoryview(os.pread(self._fd, n, offset))
                got = view.nbytes
            if got != n:
                raise OSError(f"spill file ended early: read {got} of {n} bytes; is the disk full?")
            yield entry.key, view[: entry.n_image], view[entry.n_image :]

    def close(self) -> None:
        """Drops the held records and the spill file."""
        self._held.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
            self._fd = -1

    def __enter__(self) -> "SpilledGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


T = TypeVar("T")


class SortedSpill(Generic[T]):
    """External merge sort of small picklable items under a memory budget.

    Args:
        key: the sort key; it must be a total order for the output to be
            deterministic (items with equal keys must be interchangeable).
        size_of: approximate in-memory bytes of one item.
        memory_max_bytes: items are buffered up to this many bytes, then
            sorted and written as one run.
        spill_dir: folder of the spill file (None: ``$TMPDIR``).
    """

    def __init__(
        self,
        key: Callable[[T], object],
        size_of: Callable[[T], int],
        memory_max_bytes: int = DEFAULT_SPILL_MEMORY_MAX_BYTES,
        spill_dir: str | None = None,
    ) -> None:
        self._key = key
        self._size_of = size_of
        self._budget = memory_max_bytes
        self._spill_dir = spill_dir
        self._buffer: list[T] = []
        self._buffer_bytes = 0
        self._runs: list[list[tuple[int, int]]] = []  # per run: (offset, length) of its chunks
        self._file: IO[bytes] | None = None
        self._end = 0
        self._sorted = False
        self.n_items = 0

    @property
    def spilled(self) -> bool:
        """True once at least one run went to disk."""
        return bool(self._runs)

    def add(self, item: T) -> None:
        """Adds one item."""
        self._buffer.append(item)
        self._buffer_bytes += self._size_of(item)
        self.n_items += 1
        self._sorted = False
        if self._buffer_bytes > self._budget:
            self._write_run()

    def extend(self, items: Iterable[T]) -> None:
        """Adds every item."""
        for it in items:
            self.add(it)

    def _write_run(self) -> None:
        if self._file is None:
            self._file = _temp_file(self._spill_dir)
        self._buffer.sort(key=self._key)
        chunks = []
        for i in range(0, len(self._buffer), _RUN_CHUNK_ITEMS):
            data = pickle.dumps(self._buffer[i : i + _RUN_CHUNK_ITEMS], protocol=pickle.HIGHEST_PROTOCOL)
            chunks.append((self._end, len(data)))
            self._end += _write_all(self._file.fileno(), (data,), self._spill_dir)
        self._runs.append(chunks)
        self._buffer = []
        self._buffer_bytes = 0

    def _read_run(self, chunks: list[tuple[int, int]]) -> Iterator[T]:
        assert self._file is not None
        fd = self._file.fileno()
        for offset, n in chunks:
            # Our own bytes, written by this process above: safe to unpickle.
            yield from pickle.loads(os.pread(fd, n, offset))

    def __iter__(self) -> Iterator[T]:
        """Yields every item in key order; may be iterated more than once."""
        if not self._sorted:
            self._buffer.sort(key=self._key)
            self._sorted = True
        if not self._runs:
            return iter(list(self._buffer))
        runs: list[Iterable[T]] = [self._read_run(c) for c in self._runs]
        runs.append(list(self._buffer))
        return heapq.merge(*runs, key=self._key)

    def close(self) -> None:
        """Drops the buffer and the spill file."""
        self._buffer = []
        if self._file is not None:
            self._file.close()
            self._file = None
        self._runs = []

    def __enter__(self) -> "SortedSpill[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
