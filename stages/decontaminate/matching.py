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

    Args:
        codes: the indexed hashes, ``(n, 32)`` uint8 (``as_codes``).
        max_distance: the largest Hamming distance reported.
    """

    def __init__(self, codes: np.ndarray, max_distance: int) -> None:
        if not 0 <= max_distance < N_CHUNKS * 4:
            raise ValueError(f"max_distance must be in [0, {N_CHUNKS * 4 - 1}], got {max_distance}.")
        self.codes = as_codes(codes)
        self.max_distance = max_distance
        shuffled = _shuffled(self.codes) if len(self.codes) else self.codes
        self._words = _words(shuffled)
        chunks = _chunks(shuffled)
        # All 16 chunk tables in one CSR layout: the entries sorted by chunk
        # value (chunk j's block offset by j * n), and where each of the
        # 65,536 values of each chunk starts; a lookup is two reads.
        n = len(self.codes)
        orders, starts = [], []
        for j in range(N_CHUNKS):
            order = np.argsort(chunks[:, j], kind="stable")
            orders.append(order)
            starts.append(np.cumsum(np.bincount(chunks[:, j], minlength=1 << CHUNK_BITS)) - np.bincount(chunks[:, j], minlength=1 << CHUNK_BITS) + j * n)
        self._order = np.concatenate(orders) if orders else np.zeros(0, np.int64)
        self._starts = np.concatenate([*starts, [N_CHUNKS * n]]).astype(np.int64)
        # The entries' words in table order, so candidates are read in runs.
        # Column by column: the first two words filter the candidates, and only
        # the few within reach read the other two.
        self._table_words = [np.ascontiguousarray(self._words[self._order, w]) for w in range(4)]
        self._chunk_base = (np.arange(N_CHUNKS, dtype=np.int64) << CHUNK_BITS)[None, :, None]
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
        z = np.zeros(0, np.int64)
        if n_q == 0 or n == 0:
            return z, z, z
        queries = _shuffled(queries)
        # Every probe of every chunk of every query, query-major: (n_q, 16, n_masks).
        probes = ((_chunks(queries)[:, :, None] ^ self._masks[None, None, :]) + self._chunk_base).reshape(-1)
        lo = self._starts[probes]
        counts = self._starts[probes + 1] - lo
        total = int(counts.sum())
        if total == 0:
            return z, z, z
        # Each probe's run of entries lo..lo+count-1, flattened without a loop.
        ends = np.cumsum(counts)
        positions = np.arange(total, dtype=np.int64) + np.repeat(lo - (ends - counts), counts)
        per_query = counts.reshape(n_q, -1).sum(axis=1)
        qwords = _words(queries)
        tw = self._table_words
        # uint8 sums (at most 128 over two words) keep the passes over memory short.
        dist = np.bitwise_count(np.repeat(qwords[:, 0], per_query) ^ tw[0][positions])
        dist += np.bitwise_count(np.repeat(qwords[:, 1], per_query) ^ tw[1][positions])
        near = np.flatnonzero(dist <= self.max_distance)
        q_idx = np.repeat(np.arange(n_q, dtype=np.int64), per_query)[near]
        positions, dist = positions[near], dist[near].astype(np.int64)
        for w in (2, 3):
            dist += np.bitwise_count(qwords[q_idx, w] ^ tw[w][positions])
        keep = dist <= self.max_distance
        q_idx, positions, dist = q_idx[keep], positions[keep], dist[keep]
        # A near pair is found once per chunk it shares; keep one (sorted by query, entry).
        pair = q_idx * n + self._order[positions]
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
