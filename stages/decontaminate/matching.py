"""Hamming-distance search over 256-bit hashes: multi-index hashing, not all-pairs.

Multi-index hashing (Norouzi et al., 2012): the 256 bits are cut into 16
chunks of 16 bits. If two hashes differ in at most ``k`` bits, by pigeonhole
at least one chunk differs in at most ``k // 16`` bits. So a query looks up,
in each chunk's table, its own chunk value and every value within
``k // 16`` bits of it (1 value for k <= 15, 17 for k <= 31, 137 for k <= 47),
and only those candidates get a full distance. The result is exactly the set
brute force finds (``brute_force_pairs`` is the reference, tested and
benchmarked side by side), at a cost that grows with the number of
candidates, not with the index size.

Tables are CSR arrays (entries sorted by chunk value, and the offset of each
of the 65,536 values) looked up for a whole batch of queries at once, so a
query costs no Python loop.
"""

from __future__ import annotations

import itertools

import numpy as np

from orsgen.stages.decontaminate.hashing import HASH_BYTES

N_CHUNKS = 16
CHUNK_BITS = 16
#: Queries per vectorised batch (bounds the candidate arrays' memory).
QUERY_BATCH = 2048


def as_codes(hashes: list[bytes] | np.ndarray) -> np.ndarray:
    """Packed hashes as an ``(n, 32)`` uint8 array."""
    if isinstance(hashes, np.ndarray):
        arr = np.ascontiguousarray(hashes, dtype=np.uint8)
    else:
        arr = np.frombuffer(b"".join(hashes), dtype=np.uint8) if hashes else np.zeros(0, np.uint8)
    return arr.reshape(-1, HASH_BYTES)


def _words(codes: np.ndarray) -> np.ndarray:
    return codes.view(">u8").astype(np.uint64)  # (n, 4)


def _chunks(codes: np.ndarray) -> np.ndarray:
    return codes.view(">u2").astype(np.int64)  # (n, 16)


def hamming(a: bytes, b: bytes) -> int:
    """Bits that differ between two packed hashes."""
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def _flip_masks(radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        for bits in itertools.combinations(range(CHUNK_BITS), r):
            masks.append(sum(1 << b for b in bits))
    return np.asarray(masks, dtype=np.int64)


class HammingIndex:
    """Exact search for all indexed hashes within ``max_distance`` bits of a query.

    Args:
        codes: the indexed hashes, ``(n, 32)`` uint8 (``as_codes``).
        max_distance: the largest Hamming distance reported.
    """

    def __init__(self, codes: np.ndarray, max_distance: int) -> None:
        if not 0 <= max_distance < N_CHUNKS * 4:
            raise ValueError(f"max_distance must be in [0, {N_CHUNKS * 4 - 1}], got {max_distance}.")
        self.codes = as_codes(codes)
        self.max_distance = max_distance
        self._words = _words(self.codes)
        chunks = _chunks(self.codes)
        # One table per chunk in CSR form: the entries sorted by chunk value,
        # and where each of the 65,536 values starts, so a lookup is two reads.
        self._order = [np.argsort(chunks[:, j], kind="stable") for j in range(N_CHUNKS)]
        self._starts = [
            np.concatenate([[0], np.cumsum(np.bincount(chunks[:, j], minlength=1 << CHUNK_BITS))]).astype(np.int64)
            for j in range(N_CHUNKS)
        ]
        self._masks = _flip_masks(max_distance // N_CHUNKS)

    def __len__(self) -> int:
        return len(self.codes)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All ``(query, entry)`` pairs within ``max_distance``.

        Args:
            queries: ``(q, 32)`` uint8 hashes.

        Returns:
            ``(query_idx, entry_idx, distance)`` arrays, sorted by query then
            entry.
        """
        queries = as_codes(queries)
        out_q, out_e, out_d = [], [], []
        for start in range(0, len(queries), QUERY_BATCH):
            q, e, d = self._search_batch(queries[start : start + QUERY_BATCH])
            out_q.append(q + start)
            out_e.append(e)
            out_d.append(d)
        if not out_q:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(out_q), np.concatenate(out_e), np.concatenate(out_d)

    def _search_batch(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_q, n = len(queries), len(self.codes)
        if n_q == 0 or n == 0:
            z = np.zeros(0, np.int64)
            return z, z, z
        qchunks = _chunks(queries)
        pairs = []
        for j in range(N_CHUNKS):
            probes = (qchunks[:, j, None] ^ self._masks[None, :]).ravel()  # (n_q * n_masks,)
            lo = self._starts[j][probes]
            hi = self._starts[j][probes + 1]
            counts = hi - lo
            total = int(counts.sum())
            if total == 0:
                continue
            q_of_probe = np.repeat(np.arange(n_q, dtype=np.int64), len(self._masks))
            q_idx = np.repeat(q_of_probe, counts)
            # Positions lo..hi-1 of every probe, flattened without a loop.
            offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
            entries = self._order[j][np.repeat(lo, counts) + offsets]
            pairs.append(q_idx * n + entries)
        if not pairs:
            z = np.zeros(0, np.int64)
            return z, z, z
        flat = np.sort(np.concatenate(pairs))  # by query, then entry
        flat = flat[np.concatenate([[True], flat[1:] != flat[:-1]])]
        q_idx, e_idx = flat // n, flat % n
        dist = np.bitwise_count(_words(queries)[q_idx] ^ self._words[e_idx]).sum(axis=1).astype(np.int64)
        keep = dist <= self.max_distance
        return q_idx[keep], e_idx[keep], dist[keep]


def brute_force_pairs(
    queries: np.ndarray, codes: np.ndarray, max_distance: int, batch: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The all-pairs reference: every query against every entry.

    Returns:
        ``(query_idx, entry_idx, distance)`` as ``HammingIndex.search``.
    """
    qw, cw = _words(as_codes(queries)), _words(as_codes(codes))
    out_q, out_e, out_d = [], [], []
    for start in range(0, len(qw), batch):
        d = np.bitwise_count(qw[start : start + batch, None, :] ^ cw[None, :, :]).sum(axis=2)
        q, e = np.nonzero(d <= max_distance)
        out_q.append(q + start)
        out_e.append(e)
        out_d.append(d[q, e].astype(np.int64))
    if not out_q:
        z = np.zeros(0, np.int64)
        return z, z, z
    return np.concatenate(out_q).astype(np.int64), np.concatenate(out_e).astype(np.int64), np.concatenate(out_d)
