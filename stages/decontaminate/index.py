"""The benchmark index: identities of every protected image, built once, reusable.

``build_index`` reads the configured sources (RefCOCO-family refs, COCO JSON,
an earlier orsgen output, an image folder, a hash list) into a
``BenchmarkIndex``: COCO ids, COCO file names (reduced to their id, since
COCO 2014 and 2017 name the same picture differently), sha256 digests and
256-bit pHashes (each image's own and its one-side crops). ``write_index`` /
``read_index`` keep it in one Parquet file; ``prepare_index`` is what a run
calls before it starts: read the file when it fits the config, else build
from the sources (and write the file when one is named).

A source that is missing or malformed raises ``ConfigError`` naming the
config key, so the run stops before any work.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from orsgen.schemas.config import BenchmarkSource, ConfigError, DecontaminateConfig
from orsgen.schemas.config.decontaminate import DEFAULT_REF_SPLITS
from orsgen.stages.decontaminate.hashing import HASH_BYTES, HASH_NAME, HashError, ImageHashes, image_hashes, parse_hex_hash
from orsgen.stages.decontaminate.matching import HammingIndex, as_codes

#: Kinds of identity, in the order a match is reported (strongest first).
KINDS = ("sha256", "coco_id", "file_name", "phash")
INDEX_FORMAT = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: COCO file names: ``COCO_train2014_000000391895.jpg`` (2014) or ``000000391895.jpg`` (2017).
_COCO_NAME = re.compile(r"^(?:COCO_[a-z]+20\d\d_)?(\d{12})\.jpg$")
#: Largest refs / JSON / hash-list file read into memory.
MAX_FILE_BYTES = 2 << 30


def coco_id_of_file_name(file_name: str) -> int | None:
    """The COCO id in a COCO-style file name (2014 or 2017 naming), or None."""
    m = _COCO_NAME.match(posixpath.basename(file_name or ""))
    return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class BenchmarkMatch:
    """Why one image is taken for a benchmark image.

    Attributes:
        benchmark: the source's ``name``.
        kind: ``sha256``, ``coco_id``, ``file_name`` or ``phash``.
        value: the matched identity (digest, id, file name or pHash hex).
        distance: Hamming distance in bits for ``phash`` (0 otherwise).
        ref: the benchmark image (its path or URL, or ``coco:<id>``), or "".
    """

    benchmark: str
    kind: str
    value: str
    distance: int = 0
    ref: str = ""

    def describe(self) -> str:
        """One phrase for reject messages."""
        what = f"{self.kind} {self.value}" if self.kind != "phash" else f"phash within {self.distance} bits"
        return f"{self.benchmark} ({what}{', ' + self.ref if self.ref else ''})"


@dataclass
class BenchmarkIndex:
    """Identities of the protected images.

    Attributes:
        exact: ``(kind, value) -> [(benchmark, ref), ...]`` for sha256 and
            coco_id.
        phash_codes: ``(n, 32)`` uint8 pHashes (images and their crops).
        phash_benchmark: benchmark name of each pHash row.
        phash_ref: benchmark image of each pHash row.
        max_distance: Hamming radius of a pHash match.
        crop_frac: crop fraction of the stored crop variants.
        counts: per benchmark, how many images were indexed and how many
            could not be read (``{name: {"images": n, "unreadable": m}}``).
        sources_sha256: digest of the sources' config (to know a file fits).
    """

    exact: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)
    phash_codes: np.ndarray = field(default_factory=lambda: np.zeros((0, HASH_BYTES), np.uint8))
    phash_benchmark: list[str] = field(default_factory=list)
    phash_ref: list[str] = field(default_factory=list)
    max_distance: int = 31
    crop_frac: float = 0.04
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sources_sha256: str = ""
    _matcher: HammingIndex | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # The matcher's tables are rebuilt on the worker, not shipped.
        state = dict(self.__dict__)
        state["_matcher"] = None
        return state

    @property
    def matcher(self) -> HammingIndex:
        """The multi-index search structure over the pHashes (built on first use)."""
        if self._matcher is None:
            self._matcher = HammingIndex(self.phash_codes, self.max_distance)
        return self._matcher

    def __len__(self) -> int:
        return len(self.exact) + len(self.phash_codes)

    def match(self, hashes: ImageHashes | None, coco_id: int | None = None) -> list[BenchmarkMatch]:
        """Every benchmark identity one image matches (one per benchmark and kind, nearest first)."""
        return self.match_many([(hashes, coco_id)])[0]

    def match_many(self, items: list[tuple[ImageHashes | None, int | None]]) -> list[list[BenchmarkMatch]]:
        """``match`` for a batch: the pHash search runs once, vectorised."""
        out: list[list[BenchmarkMatch]] = [[] for _ in items]
        for i, (h, coco_id) in enumerate(items):
            if h is not None:
                out[i] += [BenchmarkMatch(b, "sha256", h.sha256, 0, r) for b, r in self.exact.get(("sha256", h.sha256), [])]
            if coco_id is not None:
                out[i] += [BenchmarkMatch(b, "coco_id", str(coco_id), 0, r) for b, r in self.exact.get(("coco_id", str(coco_id)), [])]
        # The image's own pHash and, when hashed, its crops: the index holds
        # the benchmark's crops, the query brings its own, so a crop on
        # either side (benchmark copy cropped, or build copy cropped) matches.
        owner, queries = [], []
        for i, (h, _) in enumerate(items):
            if h is not None:
                for code in h.all:
                    owner.append(i)
                    queries.append(code)
        if queries and len(self.phash_codes):
            q, e, d = self.matcher.search(as_codes(queries))
            for qi, ei, di in zip(q.tolist(), e.tolist(), d.tolist()):
                i = owner[qi]
                out[i].append(BenchmarkMatch(self.phash_benchmark[ei], "phash", items[i][0].phash.hex(), di, self.phash_ref[ei]))  # type: ignore[union-attr]
        return [_best_per_kind(m) for m in out]


def _best_per_kind(matches: list[BenchmarkMatch]) -> list[BenchmarkMatch]:
    best: dict[tuple[str, str], BenchmarkMatch] = {}
    for m in sorted(matches, key=lambda m: (m.distance, m.ref)):
        best.setdefault((m.benchmark, m.kind), m)
    return sorted(best.values(), key=lambda m: (m.benchmark, KINDS.index(m.kind)))


# ---------------------------------------------------------------- reading sources


class _Builder:
    def __init__(self, cfg: DecontaminateConfig) -> None:
        self.cfg = cfg
        self.exact: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        self.codes: list[bytes] = []
        self.bench: list[str] = []
        self.refs: list[str] = []
        self.counts: dict[str, dict[str, int]] = {}

    def add_exact(self, bench: str, kind: str, value: str, ref: str) -> None:
        entry = (bench, ref)
        if entry not in self.exact[(kind, value)]:
            self.exact[(kind, value)].append(entry)

    def add_phash(self, bench: str, code: bytes, ref: str) -> None:
        self.codes.append(code)
        self.bench.append(bench)
        self.refs.append(ref)

    def add_image(self, bench: str, url: str) -> None:
        c = self.counts.setdefault(bench, {"images": 0, "unreadable": 0})
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
            h = image_hashes(data, self.cfg.crop_frac)
        except (FileNotFoundError, HashError):
            # A benchmark image that cannot be read is counted and reported,
            # not fatal: its COCO id (if any) still protects it.
            c["unreadable"] += 1
            return
        c["images"] += 1
        self.add_exact(bench, "sha256", h.sha256, url)
        for code in h.all:
            self.add_phash(bench, code, url)

    def index(self, sources_sha256: str) -> BenchmarkIndex:
        for src in self.cfg.sources:
            self.counts.setdefault(src.name, {"images": 0, "unreadable": 0})
        return BenchmarkIndex(
            exact={k: v for k, v in sorted(self.exact.items())},
            phash_codes=as_codes(self.codes).copy(),
            phash_benchmark=self.bench,
            phash_ref=self.refs,
            max_distance=self.cfg.max_distance,
            crop_frac=self.cfg.crop_frac,
            counts=dict(sorted(self.counts.items())),
            sources_sha256=sources_sha256,
        )


def _key(i: int, name: str) -> str:
    return f"decontaminate.sources.{i}.{name}"


def _read_bytes(url: str, key: str) -> bytes:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise FileNotFoundError
        if fs.isdir(path):
            raise ConfigError(f"{key}: {url!r} is a folder, not a file; point {key} at the file.")
        if (fs.size(path) or 0) > MAX_FILE_BYTES:
            raise ConfigError(f"{key}: {url!r} is larger than {MAX_FILE_BYTES >> 30} GiB; split it.")
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{key}: the benchmark file {url!r} does not exist; fix the path (relative paths are resolved against the YAML file's folder).") from None


def _require_folder(url: str, key: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isdir(path):
        raise ConfigError(f"{key}: the benchmark image folder {url!r} does not exist or is not a folder; fix the path.")
    return fs, path


def _json(data: bytes, key: str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{key}: the {what} is not valid JSON ({str(err)[:120]}); point {key} at a valid file.") from None


def _coco_images(doc: Any, key: str) -> dict[int, str]:
    """``id -> file_name`` of a COCO JSON's ``images`` (file_name validated)."""
    from orsgen.stages.ingest.coco import unsafe_file_name_problem

    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ConfigError(f"{key}: the file is not a COCO JSON with an 'images' list; point {key} at an instances_*.json.")
    out: dict[int, str] = {}
    for img in doc["images"]:
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or isinstance(img.get("id"), bool):
            raise ConfigError(f"{key}: an 'images' entry lacks an integer id ({str(img)[:80]}); fix or regenerate the file.")
        name = img.get("file_name")
        out[img["id"]] = name if isinstance(name, str) and unsafe_file_name_problem(name) is None else ""
    return out


def _read_refs_source(b: _Builder, i: int, src: BenchmarkSource) -> None:
    from orsgen.stages.ingest.coco import _read_refs
    from orsgen.schemas.records import Reject

    key = _key(i, "path")
    _read_bytes(src.path, key)  # existence and size, with the key in the error
    doc = _read_refs(src.path)
    if isinstance(doc, Reject):
        raise ConfigError(f"{key}: {doc.message.rstrip('.')}; point {key} at a RefCOCO-family refs file.")
    splits = set(src.splits or DEFAULT_REF_SPLITS)
    ids: set[int] = set()
    for r in doc:
        if not isinstance(r, dict) or not isinstance(r.get("image_id"), int) or not isinstance(r.get("split"), str):
            raise ConfigError(f"{key}: a ref lacks an integer image_id or a split ({str(r)[:80]}); point {key} at a RefCOCO-family refs file.")
        if r["split"] in splits:
            ids.add(r["image_id"])
    names: dict[int, str] = {}
    if src.instances:
        names = _coco_images(_json(_read_bytes(src.instances, _key(i, "instances")), _key(i, "instances"), "instances file"), _key(i, "instances"))
    _add_coco_ids(b, i, src, sorted(ids), names)


def _read_coco_source(b: _Builder, i: int, src: BenchmarkSource) -> None:
    key = _key(i, "path")
    names = _coco_images(_json(_read_bytes(src.path, key), key, "COCO JSON"), key)
    _add_coco_ids(b, i, src, sorted(names), names)


def _add_coco_ids(b: _Builder, i: int, src: BenchmarkSource, ids: list[int], names: dict[int, str]) -> None:
    if src.images:
        _require_folder(src.images, _key(i, "images"))
    for cid in ids:
        b.add_exact(src.name, "coco_id", str(cid), f"coco:{cid}")
        name = names.get(cid, "")
        # A COCO-style name that disagrees with the id still protects its own id.
        named = coco_id_of_file_name(name)
        if named is not None and named != cid:
            b.add_exact(src.name, "coco_id", str(named), f"coco:{named}")
        if src.images and name:
            b.add_image(src.name, src.images.rstrip("/") + "/" + name)
    b.counts.setdefault(src.name, {"images": 0, "unreadable": 0})["coco_ids"] = len(ids)


def _read_folder_source(b: _Builder, i: int, src: BenchmarkSource) -> None:
    fs, root = _require_folder(src.path, _key(i, "path"))
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    for p in files:
        b.add_image(src.name, fs.unstrip_protocol(p) if "://" in src.path else p)


def _read_orsgen_source(b: _Builder, i: int, src: BenchmarkSource, train_splits: Iterable[str]) -> None:
    from orsgen.stages.dataset.read import DatasetReadError, iter_rows, list_splits, load_manifest

    key = _key(i, "path")
    try:
        load_manifest(src.path)
        available = list_splits(src.path)
    except (DatasetReadError, FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {src.path!r} is not a finished orsgen output ({str(err).rstrip('.')}); point {key} at one.") from None
    wanted = src.splits or [s for s in available if s not in set(train_splits)]
    missing = [s for s in wanted if s not in available]
    if missing:
        raise ConfigError(f"{_key(i, 'splits')}: the output {src.path!r} has no split(s) {missing}; it has {available}.")
    c = b.counts.setdefault(src.name, {"images": 0, "unreadable": 0})
    for split in wanted:
        try:
            rows = iter_rows(src.path, split, ["image_id", "source", "sha256", "file_name", "image"])
            for row in rows:
                ref = f"{src.path.rstrip('/')}#{split}/{row['image_id']}"
                if row.get("source") in ("coco", "refcoco", "grefcoco"):
                    cid = str(row["image_id"]).rsplit(":", 1)[-1]
                    if cid.isdigit():
                        b.add_exact(src.name, "coco_id", str(int(cid)), ref)
                try:
                    h = image_hashes(row["image"], b.cfg.crop_frac, row.get("sha256") or None)
                except HashError:
                    c["unreadable"] += 1
                    continue
                c["images"] += 1
                b.add_exact(src.name, "sha256", h.sha256, ref)
                for code in h.all:
                    b.add_phash(src.name, code, ref)
        except DatasetReadError as err:
            raise ConfigError(f"{key}: split {split!r} of {src.path!r} cannot be read ({str(err).rstrip('.')}).") from None


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _read_hashes_source(b: _Builder, i: int, src: BenchmarkSource) -> None:
    key = _key(i, "path")
    data = _read_bytes(src.path, key)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: the hash list {src.path!r} is not UTF-8 text; write one sha256:<hex> or phash:<hex> a line.") from None
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, value = line.partition(":") if ":" in line else ("sha256", "", line)
        kind, value = kind.strip().lower(), value.strip().lower()
        ref = f"{posixpath.basename(src.path)}:{n}"
        if kind == "sha256" and _SHA256.match(value):
            b.add_exact(src.name, "sha256", value, ref)
        elif kind == "phash":
            try:
                b.add_phash(src.name, parse_hex_hash(value), ref)
            except ValueError:
                raise ConfigError(f"{key}: line {n} of {src.path!r} is not a 64-hex-digit pHash; fix the line.") from None
        else:
            raise ConfigError(f"{key}: line {n} of {src.path!r} is neither sha256:<64 hex> nor phash:<64 hex>; fix the line.")
        b.counts.setdefault(src.name, {"images": 0, "unreadable": 0})["hashes"] = b.counts.get(src.name, {}).get("hashes", 0) + 1


def sources_sha256(cfg: DecontaminateConfig) -> str:
    """Digest of what decides the index's content: sources, crop fraction, hash."""
    doc = {"format": INDEX_FORMAT, "hash": HASH_NAME, "crop_frac": cfg.crop_frac, "sources": [s.model_dump(mode="json") for s in cfg.sources]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


def build_index(cfg: DecontaminateConfig, train_splits: Iterable[str] = ("train",)) -> BenchmarkIndex:
    """Reads every source of ``cfg`` into a ``BenchmarkIndex``.

    Args:
        cfg: the decontamination config.
        train_splits: the run's training splits (an ``orsgen`` source without
            ``splits`` protects every other split).

    Raises:
        ConfigError: a source file is missing or malformed; the message names
            its key (``decontaminate.sources.<i>.<field>``).
    """
    b = _Builder(cfg)
    for i, src in enumerate(cfg.sources):
        if src.type == "refs":
            _read_refs_source(b, i, src)
        elif src.type == "coco":
            _read_coco_source(b, i, src)
        elif src.type == "orsgen":
            _read_orsgen_source(b, i, src, train_splits)
        elif src.type == "images":
            _read_folder_source(b, i, src)
        else:
            _read_hashes_source(b, i, src)
    return b.index(sources_sha256(cfg))


# ---------------------------------------------------------------- the index file


def write_index(index: BenchmarkIndex, url: str) -> None:
    """Writes ``index`` to one Parquet file, atomically (temp name, then rename).

    Raises:
        FileExistsError: ``url`` already exists (an index is never overwritten).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orsgen.stages.write.files import _rename, _tmp_path

    rows_kind, rows_value, rows_bench, rows_ref = [], [], [], []
    for (kind, value), entries in index.exact.items():
        for bench, ref in entries:
            rows_kind.append(kind)
            rows_value.append(value)
            rows_bench.append(bench)
            rows_ref.append(ref)
    for code, bench, ref in zip(index.phash_codes, index.phash_benchmark, index.phash_ref):
        rows_kind.append("phash")
        rows_value.append(bytes(code).hex())
        rows_bench.append(bench)
        rows_ref.append(ref)
    meta = {
        "format": INDEX_FORMAT,
        "hash": HASH_NAME,
        "crop_frac": index.crop_frac,
        "sources_sha256": index.sources_sha256,
        "counts": index.counts,
    }
    table = pa.table(
        {"kind": rows_kind, "value": rows_value, "benchmark": rows_bench, "ref": rows_ref},
        schema=pa.schema([("kind", pa.string()), ("value", pa.string()), ("benchmark", pa.string()), ("ref", pa.string())]),
    ).replace_schema_metadata({"orsgen_decontaminate": json.dumps(meta, sort_keys=True)})
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        raise FileExistsError(f"{url} already exists; orsgen never overwrites an index.")
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_path(path)
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    _rename(fs, tmp, path)


def read_index(url: str, max_distance: int, key: str = "decontaminate.index") -> tuple[BenchmarkIndex, dict[str, Any]]:
    """Reads an index file written by ``write_index``.

    Returns:
        ``(index, metadata)``.

    Raises:
        ConfigError: the file is missing, not an orsgen index, or malformed.
    """
    import pyarrow.parquet as pq

    try:
        with fsspec.open(url, "rb") as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise ConfigError(f"{key}: the index file {url!r} does not exist; give decontaminate.sources to build it.") from None
    except Exception as err:  # pyarrow raises several kinds for a non-Parquet file
        raise ConfigError(f"{key}: {url!r} is not a readable Parquet index ({str(err)[:120]}); remove it or point {key} elsewhere.") from None
    raw = (table.schema.metadata or {}).get(b"orsgen_decontaminate")
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or meta.get("hash") != HASH_NAME:
        raise ConfigError(f"{key}: {url!r} is not an orsgen benchmark index of format {INDEX_FORMAT} ({HASH_NAME}); rebuild it.")
    if set(table.column_names) != {"kind", "value", "benchmark", "ref"}:
        raise ConfigError(f"{key}: {url!r} lacks the kind/value/benchmark/ref columns; rebuild it.")
    cols = {c: table.column(c).to_pylist() for c in ("kind", "value", "benchmark", "ref")}
    exact: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    codes: list[bytes] = []
    bench: list[str] = []
    refs: list[str] = []
    for kind, value, b, r in zip(cols["kind"], cols["value"], cols["benchmark"], cols["ref"]):
        if kind == "phash":
            try:
                codes.append(parse_hex_hash(value or ""))
            except ValueError:
                raise ConfigError(f"{key}: {url!r} holds a malformed pHash {str(value)[:70]!r}; rebuild it.") from None
            bench.append(b or "")
            refs.append(r or "")
        elif kind in ("sha256", "coco_id"):
            exact[(kind, value or "")].append((b or "", r or ""))
        else:
            raise ConfigError(f"{key}: {url!r} holds an unknown identity kind {str(kind)[:40]!r}; rebuild it.")
    index = BenchmarkIndex(
        exact=dict(exact),
        phash_codes=as_codes(codes).copy(),
        phash_benchmark=bench,
        phash_ref=refs,
        max_distance=max_distance,
        crop_frac=float(meta.get("crop_frac", 0.0)),
        counts=meta.get("counts") or {},
        sources_sha256=str(meta.get("sources_sha256", "")),
    )
    return index, meta


def prepare_index(cfg: DecontaminateConfig, train_splits: Iterable[str] = ("train",)) -> BenchmarkIndex | None:
    """The index a run matches against, validated before the run starts.

    * no sources and no index file: None (nothing to match);
    * an index file that exists: read it; with sources, it must have been
      built from the same sources and crop fraction;
    * otherwise: build from the sources, and write the file when named.

    Raises:
        ConfigError: a missing or malformed benchmark file, or an index file
            built from other sources; the message names the key.
    """
    if not cfg.matching:
        return None
    if cfg.index is not None:
        fs, path = fsspec.core.url_to_fs(cfg.index)
        if fs.exists(path):
            index, _ = read_index(cfg.index, cfg.max_distance)
            if cfg.sources and index.sources_sha256 != sources_sha256(cfg):
                raise ConfigError(
                    f"decontaminate.index: {cfg.index!r} was built from other sources (or another crop_frac); "
                    "remove decontaminate.sources to use it as it is, or point decontaminate.index at a new file."
                )
            return index
        if not cfg.sources:
            raise ConfigError(f"decontaminate.index: the index file {cfg.index!r} does not exist and there are no decontaminate.sources to build it from.")
    index = build_index(cfg, train_splits)
    if cfg.index is not None:
        write_index(index, cfg.index)
    return index

