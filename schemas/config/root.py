"""The root config model, grouping one model per stage."""

from __future__ import annotations

import hashlib
import json

from typing import Any

from orsgen.schemas.config.base import ConfigModel, display_path
from orsgen.schemas.config.caption import CaptionConfig
from orsgen.schemas.config.decontaminate import DecontaminateConfig
from orsgen.schemas.config.expressions import ExpressionConfig
from orsgen.schemas.config.inputs import ImageConfig, InputConfig
from orsgen.schemas.config.regions import RegionConfig
from orsgen.schemas.config.review import ReviewConfig
from orsgen.schemas.config.splits import SplitConfig
from orsgen.schemas.config.verify import VerifySam2Config
from orsgen.schemas.config.write import WriteConfig
from pydantic import Field, model_validator


class OrsgenConfig(ConfigModel):
    """The root config of one orsgen run.

    Attributes:
        name: dataset name, used in the manifest and card.
        seed: seed of every sampling decision (combined with image ids).
        inputs: the sources to read.
        image: image reading limits.
        regions: region selection.
        splits: split assignment.
        write: shard writers.
        verify_sam2: SAM2 consistency filter and mask cleaner (off by default).
        expressions: referring expressions from annotations (categories,
            templates, no-target negatives).
        caption: VLM captioning, SA1B-CoRS and SA1B-DeRS (off by default).
        review: human screening decisions applied to the samples (off by default).
        decontaminate: benchmark decontamination and near-duplicate groups
            (off by default).
    """

    name: str = "orsgen-dataset"
    seed: int = 0
    inputs: list[InputConfig] = Field(min_length=1)
    image: ImageConfig = ImageConfig()
    regions: RegionConfig = RegionConfig()
    splits: SplitConfig = SplitConfig()
    write: WriteConfig = WriteConfig()
    verify_sam2: VerifySam2Config = VerifySam2Config()
    expressions: ExpressionConfig = ExpressionConfig()
    caption: CaptionConfig = CaptionConfig()
    review: ReviewConfig = ReviewConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> "OrsgenConfig":
        names = [i.name for i in self.inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"input names must be unique; {dupes} appear more than once.")
        return self

    def sha256(self) -> str:
        """Hex sha256 of the config (canonical JSON, input paths as the config file wrote them).

        Paths the file gave relative to its folder enter as written, so the
        same config and inputs under another folder have the same identity.
        """
        data = json.dumps(portable_dump(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode("utf-8")).hexdigest()


_INPUT_PATH_KEYS = ("shards", "annotations", "images", "refs", "instances")


def portable_dump(cfg: OrsgenConfig) -> dict[str, Any]:
    """``cfg`` as JSON values, with the paths that were relative in its file shown as written.

    Not redacted: see ``redacted_config`` for what may leave the process.
    """
    data = cfg.model_dump(mode="json")
    written = cfg.written_paths
    if not written:
        return data

    def shown(v: Any) -> Any:
        if isinstance(v, list):
            return [shown(x) for x in v]
        return display_path(v, written) if isinstance(v, str) else v

    for inp in data.get("inputs") or []:
        for k in _INPUT_PATH_KEYS:
            if k in inp:
                inp[k] = shown(inp[k])
    if isinstance(data.get("caption"), dict):
        data["caption"]["prompts"] = shown(data["caption"].get("prompts"))
    if isinstance(data.get("expressions"), dict):
        data["expressions"]["templates"] = shown(data["expressions"].get("templates"))
    dec = data.get("decontaminate")
    if isinstance(dec, dict):
        # Benchmark files and the index: the same rule, so a build's identity
        # (and its resume records) does not depend on the folder it sits in.
        dec["index"] = shown(dec.get("index"))
        for src in dec.get("sources") or []:
            for k in ("path", "images", "instances"):
                if k in src:
                    src[k] = shown(src[k])
    return data
