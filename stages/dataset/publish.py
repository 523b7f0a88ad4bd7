"""Publish an orsgen output folder to the Hugging Face Hub.

``prepare_hub_folder`` lays a run out the way the Hub expects, in a staging
folder (the run's own folder is only read)::

    STAGING/
      README.md                                   dataset card (YAML header + body from the manifest)
      data/<split>-NNNNN-of-MMMMM.parquet         Parquet config (default), one row per image
      webdataset/<split>-NNNNN-of-MMMMM.tar       WebDataset config
      rejects/rejects-NNNNN-of-MMMMM.parquet      every reject (config "rejects")
      assets/preview.png                          contact sheet shown by the card
      manifest.json                               the run's manifest, unchanged

Split names sit in the file names (the Hub's ``<split>-NNNNN-of-MMMMM``
pattern), and the card's ``configs`` name every split's files explicitly, so
custom splits (``testA``, ``ood_rare``) load like ``train``. A folder never
holds more than ``max_files_per_folder`` files (10 000, the Hub's advice): past
that, a format's files move to ``<folder>/<split>/NNNNN/``.

Every copied shard is checked against the sha256 the manifest recorded. The
staging folder is built under a temporary name and renamed when complete; a
rerun with the same inputs reuses it (that is how an interrupted upload is
resumed), and a staging folder from other inputs is never overwritten.

``upload_hub_folder`` sends it with ``huggingface_hub`` (``upload_large_folder``
where the installed version has it, else ``upload_folder``, which is the
resumable, multi-commit Xet upload since huggingface_hub 1.x). The token comes
from ``HF_TOKEN`` or ``hf auth login``; orsgen never reads, prints or logs it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import yaml

from orsgen.stages.dataset.read import check_split_name, iter_rows, list_splits, load_manifest, shards

if TYPE_CHECKING:
    from huggingface_hub import HfApi

MAX_FILES_PER_FOLDER = 10_000
MARKER_NAME = ".orsgen-publish.json"
PREVIEW_PATH = "assets/preview.png"
# The card preview looks at most this many images (round-robin over kinds).
PREVIEW_MAX_IMAGES = 2000
_COPY_CHUNK = 8 * 1024 * 1024

# Hugging Face size categories, by number of rows (images).
_SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
]


class PublishError(ValueError):
    """The folder cannot be prepared or uploaded as asked."""


# ------------------------------------------------------------------ sources


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """License and citation of one input source."""

    name: str
    license: str
    url: str
    bibtex: tuple[str, ...]


SA1B_BIB = """@inproceedings{kirillov2023segany,
  title     = {Segment Anything},
  author    = {Kirillov, Alexander and Mintun, Eric and Ravi, Nikhila and Mao, Hanzi and Rolland, Chloe and
               Gustafson, Laura and Xiao, Tete and Whitehead, Spencer and Berg, Alexander C. and Lo, Wan-Yen and
               Doll{\\'a}r, Piotr and Girshick, Ross},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  pages     = {4015--4026},
  year      = {2023}
}"""

COCO_BIB = """@inproceedings{lin2014microsoft,
  title     = {Microsoft {COCO}: Common Objects in Context},
  author    = {Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
               Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle = {European Conference on Computer Vision (ECCV)},
  pages     = {740--755},
  year      = {2014}
}"""

REFERITGAME_BIB = """@inproceedings{kazemzadeh2014referitgame,
  title     = {{ReferItGame}: Referring to Objects in Photographs of Natural Scenes},
  author    = {Kazemzadeh, Sahar and Ordonez, Vicente and Matten, Mark and Berg, Tamara},
  booktitle = {Proceedings of the 2014 Conference on Empirical Methods in Natural Language Processing (EMNLP)},
  pages     = {787--798},
  year      = {2014}
}"""

REFCOCO_BIB = """@inproceedings{yu2016modeling,
  title     = {Modeling Context in Referring Expressions},
  author    = {Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C. and Berg, Tamara L.},
  booktitle = {European Conference on Computer Vision (ECCV)},
  pages     = {69--85},
  year      = {2016}
}"""

REFCOCOG_BIB = """@inproceedings{mao2016generation,
  title     = {Generation and Comprehension of Unambiguous Object Descriptions},
  author    = {Mao, Junhua and Huang, Jonathan and Toshev, Alexander and Camburu, Oana and Yuille, Alan L. and
               Murphy, Kevin},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {11--20},
  year      = {2016}
}"""

REFCOCOG_UMD_BIB = """@inproceedings{nagaraja2016modeling,
  title     = {Modeling Context Between Objects for Referring Expression Understanding},
  author    = {Nagaraja, Varun K. and Morariu, Vlad I. and Davis, Larry S.},
  booktitle = {European Conference on Computer Vision (ECCV)},
  pages     = {792--807},
  year      = {2016}
}"""

GREFCOCO_BIB = """@inproceedings{liu2023gres,
  title     = {{GRES}: Generalized Referring Expression Segmentation},
  author    = {Liu, Chang and Ding, Henghui and Jiang, Xudong},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {23592--23601},
  year      = {2023}
}"""

SOURCES: dict[str, SourceInfo] = {
    "sa1b": SourceInfo(
        "SA-1B",
        "SA-1B Dataset Research License (research use only; images licensed from a photo provider)",
        "https://ai.meta.com/datasets/segment-anything/",
        (SA1B_BIB,),
    ),
    "coco": SourceInfo(
        "COCO",
        "annotations CC BY 4.0; images under the Flickr Terms of Use of their owners",
        "https://cocodataset.org/#termsofuse",
        (COCO_BIB,),
    ),
    "refcoco": SourceInfo(
        "RefCOCO / RefCOCO+ / RefCOCOg",
        "referring expressions distributed by the REFER authors on COCO images (COCO terms apply to the images)",
        "https://github.com/lichengunc/refer",
        (REFERITGAME_BIB, REFCOCO_BIB, REFCOCOG_BIB, REFCOCOG_UMD_BIB),
    ),
    "grefcoco": SourceInfo(
        "gRefCOCO",
        "see the gRefCOCO / GRES repository for the annotation terms (COCO terms apply to the images)",
        "https://github.com/henghuiding/gRefCOCO",
        (GREFCOCO_BIB,),
    ),
}


def sources_of(manifest: dict[str, Any]) -> list[str]:
    """Source types of a run, from its config's ``inputs``, in a fixed order.

    RefCOCO-family inputs also name the COCO images they sit on.
    """
    types = {str(i.get("type", "")) for i in (manifest.get("config") or {}).get("inputs", [])}
    if types & {"refcoco", "grefcoco"}:
        types.add("coco")
    return [t for t in SOURCES if t in types]


def default_license(sources: Sequence[str]) -> str:
    """The card's ``license``: ``other`` when SA-1B (not an open license) is in, else ``cc-by-4.0``."""
    return "other" if "sa1b" in sources else "cc-by-4.0"


# ------------------------------------------------------------------ layout


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of the Hub layout and where it comes from."""

    source: str
    dest: str  # posix path inside the repo
    sha256: str  # from the manifest ("" when it has none)
    n_bytes: int


@dataclass(slots=True)
class HubLayout:
    """Every file to stage, and the ``data_files`` patterns of each config."""

    files: list[HubFile] = field(default_factory=list)
    configs: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # split -> globs of the WebDataset tars. Not a card config: `datasets`
    # picks one builder per repo from the default config's files (see
    # LocalDatasetModuleFactory.get_module), so a webdataset config beside the
    # Parquet ones would not load; the card documents how to read them.
    webdataset: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # images per split


def _place(folder: str, split: str, names: list[str], ext: str, in_folder_total: int, limit: int) -> tuple[list[str], str]:
    """Destination paths and the glob of one split's files of one format.

    Flat ``<folder>/<split>-NNNNN-of-MMMMM.<ext>`` while the folder stays
    under ``limit`` files; else per split ``<folder>/<split>/...``, and in
    chunks ``<folder>/<split>/NNNNN/...`` when one split alone passes it.
    """
    n = len(names)
    file_names = [f"{split}-{i:05d}-of-{n:05d}.{ext}" for i in range(n)]
    if in_folder_total <= limit:
        return [f"{folder}/{f}" for f in file_names], f"{folder}/{split}-*.{ext}"
    if n <= limit:
        return [f"{folder}/{split}/{f}" for f in file_names], f"{folder}/{split}/*.{ext}"
    return [f"{folder}/{split}/{i // limit:05d}/{f}" for i, f in enumerate(file_names)], f"{folder}/{split}/*/*.{ext}"


def plan_layout(root: str, *, max_files_per_folder: int = MAX_FILES_PER_FOLDER) -> HubLayout:
    """Plans where every shard of a run goes in the Hub repo.

    Args:
        root: the run's output folder.
        max_files_per_folder: at most this many files in one folder.

    Returns:
        The layout: files with their manifest sha256, and per config
        (``default`` = Parquet, ``webdataset``, ``rejects``) the split ->
        glob patterns for the card.

    Raises:
        PublishError: a split name is not valid on the Hub, or the run has no
            Parquet shard.
    """
    if max_files_per_folder < 1:
        raise PublishError(f"max_files_per_folder must be at least 1, got {max_files_per_folder}.")
    manifest = load_manifest(root)
    splits = list_splits(root)
    for s in splits:
        check_split_name(s)
    layout = HubLayout()
    layout.rows = {s: int(v.get("images", 0)) for s, v in (manifest.get("splits") or {}).items()}

    def add(target: dict[str, list[str]], folder: str, ext: str, fmt: str) -> None:
        per_split = {s: shards(root, fmt, s) for s in splits}
        total = sum(len(v) for v in per_split.values())
        for split, refs in per_split.items():
            if not refs:
                continue
            dests, pattern = _place(folder, split, [r.url for r in refs], ext, total, max_files_per_folder)
            for ref, dest in zip(refs, dests):
                layout.files.append(HubFile(ref.url, dest, ref.sha256, ref.n_bytes))
            target[split] = [pattern]

    default: dict[str, list[str]] = {}
    add(default, "data", "parquet", "parquet")
    if not default:
        raise PublishError(f"{root} has no Parquet shards; build with write.formats including parquet to publish.")
    layout.configs["default"] = default
    add(layout.webdataset, "webdataset", "tar", "webdataset")
    rejects = shards(root, "rejects")
    n = len(rejects)
    for i, ref in enumerate(rejects):
        # Rejects are few files; past the cap they would need chunking like the data.
        layout.files.append(HubFile(ref.url, f"rejects/rejects-{i:05d}-of-{n:05d}.parquet", ref.sha256, ref.n_bytes))
    if n:
        if n > max_files_per_folder:
            raise PublishError(f"{n} rejects shards exceed {max_files_per_folder} files per folder; write fewer buckets.")
        layout.configs["rejects"] = {"rejects": ["rejects/*.parquet"]}
    return layout


def card_yaml_configs(configs: dict[str, dict[str, list[str]]], default: str = "default") -> list[dict[str, Any]]:
    """The card's ``configs`` list: one entry per config, ``data_files`` per split."""
    out = []
    for name, splits in configs.items():
        entry: dict[str, Any] = {
            "config_name": name,
            "data_files": [{"split": s, "path": p if len(p) > 1 else p[0]} for s, p in splits.items()],
        }
        if name == default:
            entry["default"] = True
        out.append(entry)
    return out


def size_category(n_rows: int) -> str:
    """The Hugging Face ``size_categories`` value of a dataset with ``n_rows`` rows."""
    for limit, name in _SIZE_CATEGORIES:
        if n_rows < limit:
            return name
    return "n>1T"


# ------------------------------------------------------------------ scan


@dataclass(slots=True)
class DataSummary:
    """What the card reports that the manifest does not: read from the samples."""

    generators: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    templates: Counter[str] = field(default_factory=Counter)
    examples_by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)


def scan_samples(root: str, splits: Sequence[str]) -> DataSummary:
    """Counts generators, models and prompt/template versions, and an example per kind.

    Only the annotation columns are read (no image bytes).
    """
    out = DataSummary()
    for split in splits:
        for row in iter_rows(root, split, ["key", "samples"]):
            for s in row["samples"] or ():
                out.generators[s["generator"] or "-"] += 1
                if s["model"]:
                    out.models[s["model"]] += 1
                if s["template"]:
                    out.templates[s["template"]] += 1
                if s["kind"] not in out.examples_by_kind:
                    out.examples_by_kind[s["kind"]] = {"expression": s["expression"], "split": split, "n_targets": len(s["target_ids"])}
    return out


# ------------------------------------------------------------------ preview


def render_preview(root: str, splits: Sequence[str], kinds: Sequence[str], *, n: int = 12, max_images: int = PREVIEW_MAX_IMAGES) -> bytes | None:
    """The card's contact sheet, drawn by ``stages.dataset.preview`` (the ``orsgen preview`` renderer).

    Samples are picked round-robin across ``kinds`` from the first
    ``max_images`` images, so a large dataset is not read to the end for a
    rare kind.

    Returns:
        PNG bytes, or None when there is no sample to show.
    """
    from orsgen.schemas.arrow import example_from_row
    from orsgen.stages.dataset import preview

    def examples() -> Any:
        for split in splits:
            for row in iter_rows(root, split):
                yield example_from_row(row)

    items = preview.pick_items(itertools.islice(examples(), max_images), n, list(kinds))
    if not items:
        return None
    sheet, _, _ = preview.render_sheet(items, cols=4)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------ card


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def decontamination_lines(counts: dict[str, Any]) -> list[str]:
    """The card's decontamination section from ``counts["decontamination"]`` ([] when the stage was off).

    Reports the benchmarks' index sizes, the overlaps found by benchmark and
    match kind (rejected or kept in held-out splits), and the near-duplicate
    groups.
    """
    dec = counts.get("decontamination") or {}
    if not dec:
        return []
    lines = ["### Decontamination", ""]
    rows: dict[str, dict[str, Any]] = {}
    for key, n in dec.items():
        parts = key.split("/")
        if parts[0] == "index" and len(parts) == 3:
            rows.setdefault(parts[1], {})[f"indexed {parts[2]}"] = n
        elif parts[0] in ("rejected", "kept_in_heldout") and len(parts) == 3:
            rows.setdefault(parts[1], {})[f"{parts[0].replace('_', ' ')} by {parts[2]}"] = n
    if rows:
        cols = sorted({c for r in rows.values() for c in r})
        lines += [
            "Every image was hashed (sha256 and a 256-bit pHash with one-side crops) and matched against these "
            "benchmarks; matched images were rejected as `benchmark_overlap` in every split, except "
            "that with `decontaminate.keep_in_heldout` a held-out split keeps its matches (counted as kept).",
            "",
            _md_table(["benchmark", *cols], [[f"`{b}`", *[r.get(c, 0) for c in cols]] for b, r in sorted(rows.items())]),
            "",
        ]
    lines.append(
        f"Images left out as benchmark copies: **{dec.get('rejected/images', 0)}**"
        + (f"; kept in held-out splits: {dec['kept_in_heldout/images']}" if dec.get("kept_in_heldout/images") else "")
        + "."
    )
    if "near_duplicates/groups" in dec:
        lines.append(
            f"Near-duplicate groups within the build: **{dec['near_duplicates/groups']}** "
            f"{_plural(dec['near_duplicates/groups'], 'group')} of "
            f"{_count(dec.get('near_duplicates/images', 0), 'image')}, each group in one split"
            + (
                f"; the grouping moved **{dec['near_duplicates/moved_images']}** "
                f"{_plural(dec['near_duplicates/moved_images'], 'image')} "
                f"({_count(dec.get('near_duplicates/moved_groups', 0), 'group')}) out of the split "
                f"{'it' if dec['near_duplicates/moved_images'] == 1 else 'they'} would have had alone."
                if "near_duplicates/moved_images" in dec
                else "."
            )
        )
    lines.append("")
    return lines


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}s"


def _count(n: int, word: str) -> str:
    return f"{n} {_plural(n, word)}"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = obj
    return out


_THRESH_RE = re.compile(r"(thresh|threshold|iou|margin|min_|max_area|ratio|tolerance|score)", re.I)
_MODEL_RE = re.compile(r"(model|checkpoint|backend|endpoint)", re.I)
_PROMPT_RE = re.compile(r"(prompt|template|version)", re.I)


def _disabled_sections(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of config sections that did not run.

    A section is off when it says ``enabled: false``, or when it has sub-jobs
    (child sections with an ``enabled`` flag) and all of them are off, as
    ``verify_sam2`` with both its filter and cleaner disabled (its ``report``
    sub-section is not a job). The card must not name models or thresholds of
    stages that never ran.
    """
    off: list[str] = []
    jobs: list[bool] = []
    for key, value in data.items():
        if not isinstance(value, dict):
            continue
        path = f"{prefix}{key}"
        if value.get("enabled") is False:
            off.append(path)
            jobs.append(False)
            continue
        if "enabled" in value and key != "report":  # a report of nothing is not a job
            jobs.append(True)
        sub_off = _disabled_sections(value, path + ".")
        if sub_off == [path]:
            off.append(path)
        else:
            off.extend(sub_off)
    if prefix and jobs and not any(jobs):
        return [prefix.rstrip(".")]
    return off


def provenance_of(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Models, prompt/template versions and thresholds named in the run's config.

    Found by key name in the flattened config, so the stages other issues add
    (VLM captioning, SAM2 verification) show up without this code knowing them.
    """
    config = manifest.get("config") or {}
    off = _disabled_sections(config)
    flat = _flatten(config)
    flat = {
        k: v
        for k, v in flat.items()
        if not k.startswith("inputs.")
        and v not in (None, "", [], {})
        and not any(k == p or k.startswith(p + ".") for p in off)
    }
    return {
        "models": {k: v for k, v in flat.items() if _MODEL_RE.search(k.rsplit(".", 1)[-1])},
        "prompts": {k: v for k, v in flat.items() if _PROMPT_RE.search(k.rsplit(".", 1)[-1])},
        "thresholds": {
            k: v
            for k, v in flat.items()
            if _THRESH_RE.search(k.rsplit(".", 1)[-1]) and isinstance(v, (int, float)) and not isinstance(v, bool)
        },
    }


def build_card(
    manifest: dict[str, Any],
    layout: HubLayout,
    summary: DataSummary,
    *,
    repo_id: str,
    license: str | None = None,
    pretty_name: str | None = None,
    has_preview: bool = True,
) -> str:
    """The dataset card: YAML header (configs, dataset_info, license, ...) and a body from the manifest.

    Args:
        manifest: the run's manifest.
        layout: from ``plan_layout``.
        summary: from ``scan_samples``.
        repo_id: ``ORG/NAME`` on the Hub.
        license: the card's license id (None: ``default_license``).
        pretty_name: display name (None: the manifest's ``name``).
        has_preview: link ``assets/preview.png``.

    Returns:
        The README.md text.
    """
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCardData

    from orsgen.schemas.arrow import EXAMPLE_SCHEMA, REJECT_SCHEMA
    sources = sources_of(manifest)
    lic = license or default_license(sources)
    name = pretty_name or str(manifest.get("name") or repo_id.split("/")[-1])
    splits = manifest.get("splits") or {}
    n_rows = sum(int(v.get("images", 0)) for v in splits.values())

    card_data = DatasetCardData(
        language=["en"],
        license=lic,
        pretty_name=name,
        size_categories=[size_category(n_rows)],
        task_categories=["image-segmentation", "object-detection"],
        task_ids=["instance-segmentation"],
        tags=["referring-expression-segmentation", "referring-segmentation", "grounding", "orsgen", "webdataset"],
        source_datasets=[SOURCES[s].name for s in sources],
        configs=card_yaml_configs(layout.configs),
    )
    if lic == "other":
        card_data["license_name"] = "mixed-source"
        card_data["license_link"] = "LICENSE.md"

    parquet_features = datasets.Features.from_arrow_schema(EXAMPLE_SCHEMA)
    parquet_features["image"] = datasets.Image()

    def split_dict(config: str) -> SplitDict:
        sd = SplitDict()
        n_rejects = sum(int(v) for v in (manifest.get("rejects_by_reason") or {}).values())
        for s in layout.configs.get(config, {}):
            sd.add(SplitInfo(name=s, num_examples=n_rejects if config == "rejects" else layout.rows.get(s, 0)))
        return sd

    infos = {"default": DatasetInfo(features=parquet_features, splits=split_dict("default"))}
    if "rejects" in layout.configs:
        infos["rejects"] = DatasetInfo(features=datasets.Features.from_arrow_schema(REJECT_SCHEMA), splits=split_dict("rejects"))
    DatasetInfosDict(infos).to_dataset_card_data(card_data)

    body = _card_body(manifest, layout, summary, repo_id=repo_id, name=name, lic=lic, sources=sources, has_preview=has_preview)
    return f"---\n{card_data.to_yaml()}\n---\n\n{body}"


def screening_section(screening: dict[str, Any]) -> list[str]:
    """The card's "Human screening" lines, from the manifest's ``counts.screening`` (none without it)."""
    splits = screening.get("splits") or {}
    if not splits:
        return []

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    rows = [
        [f"`{s}`", "yes" if v.get("required") else "no", v.get("samples", 0), v.get("accepted", 0), v.get("human_rejected", 0),
         v.get("skipped", 0), v.get("unscreened", 0), v.get("written", 0), pct(v.get("acceptance_rate")), pct(v.get("screened_frac"))]
        for s, v in sorted(splits.items())
    ]
    reasons: dict[str, int] = {}
    for v in splits.values():
        for k, n in (v.get("rejected_by_reason") or {}).items():
            reasons[k] = reasons.get(k, 0) + n
    d = screening.get("decisions") or {}
    out = [
        "## Human screening",
        "",
        "Samples were judged by people in `orsgen review`. Rejected samples were dropped (`human_rejected`); "
        "in splits that require screening, samples nobody accepted were held out (`unscreened`); "
        "accepted samples carry `screened: true`.",
        "",
        _md_table(
            ["split", "screening required", "samples", "accepted", "rejected", "skipped", "held out (unscreened)", "written", "acceptance rate", "screened share of written"],
            rows,
        ),
        "",
        f"The decisions judged {d.get('samples', 0)} sample(s): {d.get('matched', 0)} in this build, "
        f"{d.get('unmatched', 0)} not in it; "
        f"decisions sha256 `{screening.get('decisions_sha256', '')}`.",
        "",
    ]
    if reasons:
        out += ["Rejections by reason:", "", _md_table(["reason", "count"], sorted(reasons.items())), ""]
    return out


def _crowd_section(manifest: dict[str, Any]) -> list[str]:
    """What the card says about crowd annotations, from the config and the expressions counts."""
    expr = (manifest.get("config") or {}).get("expressions") or {}
    if not expr.get("enabled", False):
        return []
    policy = expr.get("crowd_policy", "skip")
    counts = (manifest.get("counts") or {}).get("expressions") or {}
    if policy == "non_crowd":
        n = int(counts.get("category/crowd_region_unmasked", 0))
        return [
            "## Crowd regions",
            "",
            "Built with `crowd_policy: non_crowd`: a category sample (\"all people\") of a category that also has a "
            "COCO crowd annotation targets only the non-crowd instances, so **the crowd region is left unmasked** "
            f"although the words name it. {n:,} sample(s) are like this; their metadata holds `crowd_excluded: true`, "
            "`crowd_policy` and the left-out `crowd_ids`. Drop them where exact extent matters.",
            "",
        ]
    return [
        "## Crowd regions",
        "",
        "Built with `crowd_policy: skip`: a category with a COCO crowd annotation gets no category or descriptive "
        "sample, so every mask covers everything its words name.",
        "",
    ]


def _card_body(
    manifest: dict[str, Any],
    layout: HubLayout,
    summary: DataSummary,
    *,
    repo_id: str,
    name: str,
    lic: str,
    sources: list[str],
    has_preview: bool,
) -> str:
    counts = manifest.get("counts") or {}
    splits = manifest.get("splits") or {}
    kinds = sorted({k for v in splits.values() for k in (v.get("samples_by_kind") or {})})
    n_images = sum(int(v.get("images", 0)) for v in splits.values())
    n_samples = sum(int(v.get("samples", 0)) for v in splits.values())
    parts: list[str] = [f"# {name}", ""]
    parts.append(
        f"Open-world referring-segmentation data built with orsgen {manifest.get('orsgen_version', '')}: "
        f"**{n_images:,} images** and **{n_samples:,} referring samples** (an expression and the exact "
        f"COCO-RLE mask it refers to) in {len(splits)} split(s): "
        + ", ".join(f"`{s}`" for s in sorted(splits))
        + "."
    )
    parts.append("")
    if has_preview:
        parts += ["![preview: image, mask overlay, target boxes and points, kind and expression](" + PREVIEW_PATH + ")", ""]

    first = "train" if "train" in splits else (sorted(splits)[0] if splits else "train")
    parts += ["## Load it", "", "```python", "from datasets import load_dataset", ""]
    parts.append(f'ds = load_dataset("{repo_id}")  # Parquet, one row per image, every split')
    parts += [f'row = ds["{first}"][0]', 'for s in row["samples"]:', '    print(s["kind"], s["expression"], s["union_rle"]["size"], len(s["targets"]))']
    if layout.webdataset:
        parts += [
            "",
            "# The same rows as WebDataset shards (<key>.jpg + <key>.json), for streaming trainers:",
            "from orsgen import webdataset_features  # pins the json column types",
            "wds = load_dataset(",
            '    "webdataset",',
            "    data_files={"
            + ", ".join(f'"{s}": "hf://datasets/{repo_id}/{p[0]}"' for s, p in sorted(layout.webdataset.items()))
            + "},",
            "    features=webdataset_features(),",
            "    streaming=True,",
            ")",
        ]
    parts += ["```", ""]
    if layout.webdataset:
        parts += [
            "The WebDataset shards are not a `configs` entry: `datasets` builds every config of a repository with",
            "one builder (the default config's format), so they are read with the snippet above, with the",
            "`webdataset` library, or with orsgen's PyTorch loader (`orsgen.stages.dataset.loader`).",
            "",
        ]
    parts += [
        "Trainer exports (Seg-Zero, VisionReasoner, LENS, Qwen-VL, Moondream, RefCOCO-M) and the standard",
        "metrics (cIoU, gIoU, N-acc, T-acc) come with orsgen: `orsgen export`, `orsgen eval`.",
        "",
    ]

    parts += ["## Structure", ""]
    parts += [
        "One row per image: `key`, `image_id`, `source`, `width`, `height`, `split`, `image` (encoded bytes), "
        "`instances` (COCO RLE masks, boxes, categories), `refs` (RefCOCO-family refs) and `samples`. Each sample "
        "holds `expression`, `kind`, `target_ids`, the union mask `union_rle` (COCO RLE, `size = [h, w]`), "
        "`union_svg` (normalised SVG path) and per target `bbox_xyxy` (pixels), `point_1` / `point_2` "
        "(interior points) and `qwen_box` (0-1000). A `no_target` sample has an empty mask and no targets.",
        "",
    ]
    if summary.examples_by_kind:
        parts += [_md_table(["kind", "example", "targets"], [[f"`{k}`", v["expression"].replace("|", "\\|"), v["n_targets"]] for k, v in sorted(summary.examples_by_kind.items())]), ""]

    parts += _crowd_section(manifest)

    parts += ["## Funnel", ""]
    levels = counts.get("levels") or {}
    if levels:
        parts += [
            _md_table(
                ["level", "inputs", "written", "rejected", "reconciled"],
                [[lvl, v.get("inputs"), v.get("written"), v.get("rejected"), "yes" if v.get("reconciled") else "**NO**"] for lvl, v in levels.items()],
            ),
            "",
            "Every input is either written or rejected with a reason (`inputs = written + rejected` at every level).",
            "",
        ]
    reasons = manifest.get("rejects_by_reason") or {}
    if reasons:
        parts += ["Drops by reason:", "", _md_table(["level/reason", "count"], sorted(reasons.items())), ""]
    if splits:
        rows = []
        for s, v in sorted(splits.items()):
            by = v.get("samples_by_kind") or {}
            rows.append([f"`{s}`", v.get("images", 0), v.get("samples", 0), *[by.get(k, 0) for k in kinds]])
        parts += ["Samples by split and kind:", "", _md_table(["split", "images", "samples", *kinds], rows), ""]
    parts += decontamination_lines(counts)

    parts += screening_section(counts.get("screening") or {})

    parts += ["## Provenance", ""]
    prov = provenance_of(manifest)
    parts += [
        f"- orsgen version: `{manifest.get('orsgen_version', '')}`",
        f"- config sha256: `{manifest.get('config_sha256', '')}` (the resolved config is in `manifest.json`)",
        "- expression generators: " + (", ".join(f"`{k}` ({v})" for k, v in summary.generators.most_common()) or "none"),
        "- models: " + (", ".join(f"`{k}` ({v} samples)" for k, v in summary.models.most_common()) or "none (annotation-driven samples only)"),
        "- templates / prompt versions: " + (", ".join(f"`{k}` ({v})" for k, v in summary.templates.most_common()) or "none"),
        "",
    ]
    if prov["models"] or prov["prompts"]:
        parts += ["Model and prompt settings:", "", _md_table(["config key", "value"], [[f"`{k}`", f"`{v}`"] for k, v in {**prov["models"], **prov["prompts"]}.items()]), ""]
    if prov["thresholds"]:
        parts += ["Thresholds:", "", _md_table(["config key", "value"], [[f"`{k}`", v] for k, v in prov["thresholds"].items()]), ""]

    parts += ["## Files", ""]
    cfg_rows = []
    views = [(f"config `{c}`", sp) for c, sp in layout.configs.items()]
    if layout.webdataset:
        views.append(("WebDataset", layout.webdataset))
    for label, sp in views:
        for s, pats in sp.items():
            n = sum(1 for f in layout.files if _matches(f.dest, pats))
            cfg_rows.append([label, f"`{s}`", ", ".join(f"`{p}`" for p in pats), n])
    parts += [_md_table(["variant", "split", "files", "count"], cfg_rows), ""]
    parts += ["`manifest.json` lists every shard of the run with its sha256; `orsgen publish` checked each copy against it.", ""]

    parts += ["## Licenses and sources", ""]
    parts.append(f"Card license field: `{lic}`. The data inherits the terms of its sources:")
    parts.append("")
    for s in sources:
        info = SOURCES[s]
        parts.append(f"- **{info.name}**: {info.license} ({info.url})")
    parts += ["", "## Citation", "", "If you use this data, cite its sources:", "", "```bibtex"]
    seen: set[str] = set()
    for s in sources:
        for bib in SOURCES[s].bibtex:
            if bib not in seen:
                seen.add(bib)
                parts += [bib, ""]
    if parts[-1] == "":
        parts.pop()
    parts += ["```", ""]
    return "\n".join(parts)


def _matches(path: str, patterns: Sequence[str]) -> bool:
    import fnmatch

    # fnmatch's * crosses "/", so compare the depth too.
    return any(fnmatch.fnmatch(path, p) and path.count("/") == p.count("/") for p in patterns)


def license_text(sources: Sequence[str]) -> str:
    """``LICENSE.md`` for a card whose license is ``other``: the terms of each source."""
    lines = ["# Licenses", "", "This dataset combines data under different terms. Each part keeps its source's terms:", ""]
    for s in sources:
        info = SOURCES[s]
        lines.append(f"- **{info.name}**: {info.license}. See {info.url}")
    lines += ["", "The masks, boxes and expressions orsgen derived inherit the terms of the data they derive from.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ staging


def _copy_checked(src: str, dest: Path, want_sha256: str, link: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
    h = hashlib.sha256()
    if link and os.path.isfile(src):
        os.link(src, tmp)
        with open(tmp, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                h.update(chunk)
    else:
        with fsspec.open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_COPY_CHUNK):
                h.update(chunk)
                fout.write(chunk)
    if want_sha256 and h.hexdigest() != want_sha256:
        tmp.unlink()
        raise PublishError(
            f"{src} does not match the sha256 its manifest recorded ({want_sha256[:12]}..., found {h.hexdigest()[:12]}...); "
            "the output was changed after the run. Rebuild it before publishing."
        )
    os.replace(tmp, dest)


@dataclass(frozen=True, slots=True)
class PreparedFolder:
    """A staging folder ready to upload."""

    path: Path
    n_files: int
    n_bytes: int
    reused: bool
    configs: dict[str, dict[str, list[str]]]


def default_staging(root: str) -> Path:
    """``<DIR>-hub`` beside the run folder (never inside it)."""
    return Path(str(root).rstrip("/") + "-hub")


def prepare_hub_folder(
    root: str,
    staging: str | Path,
    *,
    repo_id: str,
    license: str | None = None,
    pretty_name: str | None = None,
    max_files_per_folder: int = MAX_FILES_PER_FOLDER,
    link: bool = False,
    preview_n: int = 12,
) -> PreparedFolder:
    """Builds (or reuses) the Hub layout of a run in ``staging``.

    Args:
        root: the run's output folder; only read.
        staging: the local folder to build; must not exist, or be a complete
            staging folder of the same run and options (then it is reused).
        repo_id: ``ORG/NAME``; goes into the card's snippets.
        license: card license id (None: ``other`` with SA-1B, else ``cc-by-4.0``).
        pretty_name: card title (None: the run's name).
        max_files_per_folder: folder file cap (Hub advice: 10 000).
        link: hard-link shards instead of copying them (same file system
            only; the staged files then share storage with the run's).
        preview_n: samples in the preview contact sheet.

    Returns:
        The prepared folder.

    Raises:
        PublishError: bad repo id, staging inside the run folder, staging
            folder of another run, or a shard that does not match its
            manifest sha256.
    """
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise PublishError(f"repo id {repo_id!r} must look like ORG/NAME (letters, digits, '-', '_', '.').")
    staging = Path(staging).absolute()
    if "://" not in str(root):
        rp = Path(root).absolute()
        if staging == rp or rp in staging.parents:
            raise PublishError(f"the staging folder {staging} is inside the dataset folder {rp}; publish never writes there. Pass --staging elsewhere.")
    manifest = load_manifest(root)
    manifest_sha = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest()
    options = {
        "manifest_sha256": manifest_sha,
        "repo_id": repo_id,
        "license": license,
        "pretty_name": pretty_name,
        "max_files_per_folder": max_files_per_folder,
        "preview_n": preview_n,
    }
    layout = plan_layout(root, max_files_per_folder=max_files_per_folder)
    if staging.exists():
        marker = staging / MARKER_NAME
        try:
            found = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        if found != options:
            raise PublishError(
                f"{staging} exists and is not a staging folder of this run with these options; "
                "orsgen never overwrites files. Pass a new --staging, or remove the old one."
            )
        missing = [f.dest for f in layout.files if not (staging / f.dest).is_file()]
        if missing:
            raise PublishError(f"staging folder {staging} is incomplete ({missing[0]} is missing); remove it and run again.")
        n_bytes = sum((staging / f.dest).stat().st_size for f in layout.files)
        return PreparedFolder(staging, len(layout.files), n_bytes, True, layout.configs)

    staging.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging.parent / f".{staging.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for f in layout.files:
            _copy_checked(f.source, tmp / f.dest, f.sha256, link)
        with fsspec.open(posixpath.join(str(root).rstrip("/"), "manifest.json"), "rb") as fin:
            (tmp / "manifest.json").write_bytes(fin.read())
        splits = sorted(layout.configs["default"])
        summary = scan_samples(root, splits)
        png = render_preview(root, splits, sorted(summary.examples_by_kind), n=preview_n)
        has_preview = png is not None
        if png is not None:
            (tmp / PREVIEW_PATH).parent.mkdir(parents=True, exist_ok=True)
            (tmp / PREVIEW_PATH).write_bytes(png)
        card = build_card(manifest, layout, summary, repo_id=repo_id, license=license, pretty_name=pretty_name, has_preview=has_preview)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if (license or default_license(sources_of(manifest))) == "other":
            (tmp / "LICENSE.md").write_text(license_text(sources_of(manifest)), encoding="utf-8")
        (tmp / MARKER_NAME).write_text(json.dumps(options, sort_keys=True), encoding="utf-8")
        os.rename(tmp, staging)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_bytes = sum((staging / f.dest).stat().st_size for f in layout.files)
    return PreparedFolder(staging, len(layout.files), n_bytes, False, layout.configs)


# ------------------------------------------------------------------ upload


def redact(text: str) -> str:
    """Removes anything token-like (and the token in ``HF_TOKEN``) from a message."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def upload_hub_folder(
    staging: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    api: "HfApi | None" = None,
) -> str:
    """Creates the dataset repo if needed and uploads the staging folder, resumably.

    The token is whatever ``huggingface_hub`` finds (``HF_TOKEN``, or the
    login from ``hf auth login``); this function never reads or prints it.
    Re-running after an interruption resumes: files already committed are
    skipped and uploaded chunks are deduplicated.

    Args:
        staging: a folder from ``prepare_hub_folder``.
        repo_id: ``ORG/NAME``.
        private: create the repo private (an existing repo keeps its setting).
        revision: branch to commit to (created from ``main`` if missing);
            None commits to ``main``.
        api: the ``HfApi`` to use (tests pass one whose methods record calls).

    Returns:
        The dataset's URL on the Hub.

    Raises:
        PublishError: no token is available.
    """
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise PublishError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, then publish again.")
    api = api or HfApi()
    api.create_repo(repo_id=repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id=repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    ignore = [MARKER_NAME, "**/.*.tmp-*"]
    large = getattr(api, "upload_large_folder", None)
    if large is not None:
        large(repo_id=repo_id, folder_path=str(staging), repo_type="dataset", revision=revision, private=private, ignore_patterns=ignore)
    else:
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staging),
            repo_type="dataset",
            revision=revision,
            commit_message="Upload dataset with orsgen publish",
            ignore_patterns=ignore,
        )
    return f"https://huggingface.co/datasets/{repo_id}" + (f"/tree/{revision}" if revision else "")


def hub_card_yaml(readme: str) -> dict[str, Any]:
    """The YAML header of a card, parsed (tests, debugging)."""
    m = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    if not m:
        raise PublishError("the card has no YAML header.")
    return yaml.safe_load(m.group(1))
