"""Near-duplicate groups within one build: LSH buckets, then one grouping step.

Every image's pHash and crop variants are cut into the 16 chunks of the
multi-index (``matching``); an image goes into one bucket per distinct
``(chunk index, chunk value)`` of its hashes. Two images within ``k`` bits
share an exact chunk whenever ``k < 16`` (pigeonhole) and almost always up to
``k = 31``. Inside one bucket, the pairs within ``k`` are found with the
same multi-index search (never all pairs), giving edges; the edges of the
whole build, few because they only join near-duplicates, are merged with a
union-find into groups. A group is named by its smallest image id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from orsgen.stages.decontaminate.matching import CHUNK_BITS, N_CHUNKS, HammingIndex, as_codes, brute_force_pairs

#: Up to this many (query, member) pairs a bucket is compared all-pairs: the
#: search tables cost a fixed 4 MB and ~5 ms to build, more than comparing a
#: small bucket (measured: 10 members 0.07 vs 4.9 ms, 100 members 1.8 vs
#: 5.4 ms, 400 members 32 vs 9 ms; each member brings 5 queries). The
#: results are the same either way.
BUCKET_BRUTE_FORCE_PAIRS = 1 << 17


@dataclass(frozen=True, slots=True)
class HashedImage:
    """One build image's pHashes, the light record the grouping shuffles.

    Attributes:
        image_id: the image id.
        phash: its packed pHash.
        crops: pHashes of its one-side crops.
    """

    image_id: str
    phash: bytes
    crops: tuple[bytes, ...] = ()


def bucket_keys(img: HashedImage) -> list[tuple[int, int]]:
    """The distinct ``(chunk index, chunk value)`` buckets of an image's hashes."""
    keys = set()
    for code in (img.phash, *img.crops):
        for j in range(N_CHUNKS):
            keys.add((j, int.from_bytes(code[2 * j : 2 * j + 2], "big")))
    return sorted(keys)


def bucket_edges(images: Iterable[HashedImage], max_distance: int) -> list[tuple[str, str]]:
    """Pairs of distinct images in one bucket whose hashes lie within ``max_distance``.

    A pair counts when any hash of one (pHash or crop) is within
    ``max_distance`` of the other's pHash.

    Returns:
        Sorted ``(smaller id, larger id)`` pairs, each once.
    """
    by_id = {img.image_id: img for img in images}
    members = [by_id[k] for k in sorted(by_id)]
    if len(members) < 2:
        return []
    queries, owner = [], []
    for i, m in enumerate(members):
        for code in (m.phash, *m.crops):
            queries.append(code)
            owner.append(i)
    codes = as_codes([m.phash for m in members])
    if len(queries) * len(members) <= BUCKET_BRUTE_FORCE_PAIRS:
        q, e, _ = brute_force_pairs(as_codes(queries), codes, max_distance, batch=len(queries))
    else:
        q, e, _ = HammingIndex(codes, max_distance).search(as_codes(queries))
    owner_arr = np.asarray(owner, dtype=np.int64)
    edges = set()
    for a, b in zip(owner_arr[q].tolist(), e.tolist()):
        if a != b:
            x, y = members[a].image_id, members[b].image_id
            edges.add((x, y) if x < y else (y, x))
    return sorted(edges)


def connected_groups(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find over near-duplicate edges.

    Returns:
        ``image_id -> group id`` (the smallest image id of its group) for
        every image on an edge; images on no edge are singletons and absent.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            # The smaller id becomes the root, so a group's name is its smallest id.
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
    return {x: find(x) for x in sorted(parent)}


def group_sizes(groups: dict[str, str]) -> dict[str, int]:
    """Members per group id."""
    sizes: dict[str, int] = {}
    for g in groups.values():
        sizes[g] = sizes.get(g, 0) + 1
    return sizes


def near_duplicate_groups(images: Sequence[HashedImage], max_distance: int) -> dict[str, str]:
    """The whole grouping in memory (tests, small builds): buckets, edges, union-find."""
    buckets: dict[tuple[int, int], list[HashedImage]] = {}
    for img in images:
        for key in bucket_keys(img):
            buckets.setdefault(key, []).append(img)
    edges = set()
    for key in sorted(buckets):
        edges.update(bucket_edges(buckets[key], max_distance))
    return connected_groups(sorted(edges))


assert CHUNK_BITS * N_CHUNKS == 256


def group_split(members: Iterable[tuple[str, str, str]], train_splits: Sequence[str]) -> tuple[str, list[str]]:
    """A near-duplicate group's one split, and the images it moved.

    Args:
        members: ``(image_id, split alone, split by the group's hash)`` for
            every copy of every member (an image read from several inputs
            has several copies).
        train_splits: the training splits.

    Returns:
        ``(split, moved)``: the most protected of the members' splits (by the
        group's hash; ``stages.splits.most_protected_split``) and the sorted
        ids of the members whose own split (the most protected of their
        copies' splits, as the splits stage resolves them alone) differs.
    """
    from orsgen.stages.splits import most_protected_split

    members = list(members)
    split = most_protected_split([grouped for _, _, grouped in members], train_splits)
    alone: dict[str, list[str]] = {}
    for image_id, own, _ in members:
        alone.setdefault(image_id, []).append(own)
    moved = sorted(i for i, splits in alone.items() if most_protected_split(splits, train_splits) != split)
    return split, moved

