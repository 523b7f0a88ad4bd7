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

Tables are CSR arrays (entries sorted by chunk value, and where the run of
each of the 65,536 values starts) looked up for a whole batch of queries at
once, so a query costs no Python loop. While memory allows
(``TABLE_BUDGET_BYTES``), each entry is filed under every value within
``k // 16`` bits of its chunk (the "expanded" layout), so a query reads 16
runs instead of 16 x 17: the same candidates, about 30% less time.
"""

from __future__ import annotations

import itertools

import numpy as np

from orsgen.stages.decontaminate.hashing import HASH_BYTES

N_CHUNKS = 16
CHUNK_BITS = 16
#: Queries per vectorised batch: bounds the candidate arrays' memory (about
#: 500 candidates a query at 100,000 hashes) and keeps them near the cache;
#: 512 measured best of 64..2048.
QUERY_BATCH = 512
#: Default memory bound of the expanded tables (``HammingIndex``): 256 MB,
#: about 235,000 hashes at max_distance 31 (1,088 bytes each); a larger
#: index uses the plain layout (64 bytes each). Measured on 100,000 pHashes
#: at k = 31, 1,000 queries a search (benchmarks/bench_decontaminate.py, idle
#: box): expanded 11-12 us a query, plain 18 us; after 2 s of other work,
#: when the tables have left the caches, 56-112 against 46-73 us.
TABLE_BUDGET_BYTES = 256 << 20


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


#: A fixed shuffle of the 256 bit positions, applied to index and queries alike
#: before chunking. pHash bits are ordered by frequency and the low ones are
#: correlated across images; spreading them over all chunks makes chunk values
#: closer to uniform, so fewer random candidates share a chunk. Hamming
#: distance does not depend on bit order, so results are unchanged.
_BIT_ORDER = np.random.default_rng(20240229).permutation(HASH_BYTES * 8)


def _shuffled(codes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.packbits(np.unpackbits(codes, axis=1)[:, _BIT_ORDER], axis=1))


def _flip_masks(radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        for bits in itertools.combinations(range(CHUNK_BITS), r):
            masks.append(sum(1 << b for b in bits))
    return np.asarray(masks, dtype=np.int64)


class HammingIndex:
    """Exact search for all indexed hashes within ``max_distance`` bits of a query.

    Every chunk's neighbours within ``r = max_distance // 16`` bits must be
    visited. Two layouts do that with the same search code:

    * **expanded** (the default while it fits ``table_budget_bytes``): each
      entry is filed under its chunk value *and* every value within ``r``
      bits of it (17 places per chunk for k = 31), so a query reads one run
      per chunk: 16 probes instead of 272. It costs 4 bytes x 16 chunks x
      17 = 1,088 bytes per hash (109 MB for 100,000 hashes).
    * **plain** (above the budget): each entry filed once per chunk (64
      bytes per hash); the query probes its value and every value within
      ``r`` bits.

    The candidates, and so the results, are the same in both.

    Args:
        codes: the indexed hashes, ``(n, 32)`` uint8 (``as_codes``).
        max_distance: the largest Hamming distance reported.
        table_budget_bytes: the most memory the expanded tables may take;
            above it the plain layout is used.
    """

    def __init__(self, codes: np.ndarray, max_distance: int, table_budget_bytes: int = TABLE_BUDGET_BYTES) -> None:
        if not 0 <= max_distance < N_CHUNKS * 4:
            raise ValueError(f"max_distance must be in [0, {N_CHUNKS * 4 - 1}], got {max_distance}.")
        self.codes = as_codes(codes)
        self.max_distance = max_distance
        shuffled = _shuffled(self.codes) if len(self.codes) else self.codes
        words = _words(shuffled)
        # The four 64-bit words of the entries, one compact array each (8
        # bytes per entry: the candidate reads stay within a few MB of cache).
        self._cols = [np.ascontiguousarray(words[:, w]) for w in range(4)]
        chunks = _chunks(shuffled).astype(np.uint16)
        masks = _flip_masks(max_distance // N_CHUNKS)
        n = len(self.codes)
        # (At radius 0 the two layouts are one.)
        self.expanded = len(masks) == 1 or n * N_CHUNKS * len(masks) * 4 <= table_budget_bytes
        copies = len(masks) if self.expanded else 1
        per_chunk = n * copies
        if per_chunk * N_CHUNKS >= 1 << 31:
            raise ValueError(f"a HammingIndex holds at most {(1 << 31) // (N_CHUNKS * copies) - 1} hashes here, got {n}.")
        # All 16 chunk tables in one CSR layout: the entry ids sorted by the
        # value they are filed under, and for each of the 16 x 65,536
        # (chunk, value) slots where its run starts (int32: 4 MB; the run
        # ends where the next one starts, mostly in the same cache line).
        order = np.empty(N_CHUNKS * per_chunk, np.int32)
        starts = np.empty((N_CHUNKS << CHUNK_BITS) + 1, np.int32)
        ids = np.tile(np.arange(n, dtype=np.int32), copies)
        for j in range(N_CHUNKS):
            keys = (chunks[None, :, j] ^ masks[:copies, None].astype(np.uint16)).reshape(-1)
            # A stable sort of 16-bit keys is a radix sort in numpy: linear.
            order[j * per_chunk : (j + 1) * per_chunk] = ids[np.argsort(keys, kind="stable")]
            counts = np.bincount(keys, minlength=1 << CHUNK_BITS)
            starts[j << CHUNK_BITS : (j + 1) << CHUNK_BITS] = np.cumsum(counts) - counts + j * per_chunk
        starts[-1] = len(order)
        self._order = order
        self._starts = starts
        self._chunk_base = (np.arange(N_CHUNKS, dtype=np.int64) << CHUNK_BITS)[None, :, None]
        # The values a query probes per chunk: its own (expanded), or its own
        # and every one within r bits (plain).
        self._masks = masks[:1] if self.expanded else masks

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
        z = np.zeros(0, np.int64)
        if n_q == 0 or n == 0:
            return z, z, z
        queries = _shuffled(queries)
        # Every probe of every chunk of every query, query-major: (n_q, 16, n_masks).
        probes = ((_chunks(queries)[:, :, None] ^ self._masks[None, None, :]) + self._chunk_base).reshape(-1)
        lo = np.take(self._starts, probes)
        counts = np.take(self._starts, probes + 1) - lo
        ends = np.cumsum(counts, dtype=np.int64)
        total = int(ends[-1])
        if total == 0:
            return z, z, z
        # Each probe's run of entries start..start+count-1, flattened without
        # a loop: a running index plus, per run, its start minus where it lands.
        shift = (lo - (ends - counts)).astype(np.int32)
        entries = np.take(self._order, np.arange(total, dtype=np.int32) + np.repeat(shift, counts))
        per_query = counts.reshape(n_q, -1).sum(axis=1)
        qwords = _words(queries)
        cols = self._cols
        # Two words first (uint8 sums, at most 128): random pairs differ in
        # about 64 of those 128 bits, so few candidates read the other two.
        dist = np.bitwise_count(np.take(cols[0], entries) ^ np.repeat(qwords[:, 0], per_query))
        dist += np.bitwise_count(np.take(cols[1], entries) ^ np.repeat(qwords[:, 1], per_query))
        near = np.flatnonzero(dist <= self.max_distance)
        q_idx = np.repeat(np.arange(n_q, dtype=np.int64), per_query)[near]
        entries, dist = entries[near], dist[near].astype(np.int64)
        for w in (2, 3):
            dist += np.bitwise_count(np.take(cols[w], entries) ^ qwords[q_idx, w])
        keep = dist <= self.max_distance
        q_idx, entries, dist = q_idx[keep], entries[keep], dist[keep]
        # A near pair is found once per chunk it shares; keep one (sorted by query, entry).
        pair = q_idx * n + entries
        pair, first = np.unique(pair, return_index=True)
        return pair // n, pair % n, dist[first]


def brute_force_pairs(
    queries: np.ndarray, codes: np.ndarray, max_distance: int, batch: int = 1
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
