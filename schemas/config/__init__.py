"""Config models: YAML validated by pydantic, one module per stage under one root.

Modules, in pipeline order: ``inputs`` (ingest and image limits), ``regions``,
``expressions``, ``caption``, ``verify`` (SAM2), ``decontaminate``, ``splits``,
``review`` (screening), ``write``; ``root``
holds ``OrsgenConfig``, which imports them; ``loading`` reads YAML and
overrides; ``redact`` masks secrets. Everything is importable from here.

Load with ``load_config(path, overrides)``. A validation error is raised as
``ConfigError`` whose message names every bad key with its value, e.g.
``regions.min_area_frac = -1: Input should be greater than or equal to 0``.
Beam runner flags are not part of this config; they stay Beam's own
``PipelineOptions``.
"""

from orsgen.schemas.config.base import ConfigError, ConfigModel
from orsgen.schemas.config.caption import (
    CaptionBackendConfig,
    CaptionConfig,
    CaptionSamplingConfig,
    CorsConfig,
    DersConfig,
    OverlayConfig,
)
from orsgen.schemas.config.decontaminate import BenchmarkSource, DecontaminateConfig
from orsgen.schemas.config.expressions import ExpressionCaps, ExpressionConfig, ExpressionKinds
from orsgen.schemas.config.inputs import CocoInput, GrefcocoInput, ImageConfig, InputConfig, RefcocoInput, Sa1bInput
from orsgen.schemas.config.loading import apply_overrides, config_from_dict, load_config
from orsgen.schemas.config.redact import REDACTED, SECRET_FLAGS, redact_argv, redacted_config
from orsgen.schemas.config.regions import RegionConfig
from orsgen.schemas.config.review import ReviewConfig
from orsgen.schemas.config.root import OrsgenConfig
from orsgen.schemas.config.splits import OodRule, SplitConfig
from orsgen.schemas.config.verify import Sam2CleanConfig, Sam2FilterConfig, Sam2ReportConfig, VerifySam2Config
from orsgen.schemas.config.write import WriteConfig

__all__ = [
    "REDACTED",
    "SECRET_FLAGS",
    "BenchmarkSource",
    "CaptionBackendConfig",
    "CaptionConfig",
    "CaptionSamplingConfig",
    "CocoInput",
    "ConfigError",
    "ConfigModel",
    "CorsConfig",
    "DecontaminateConfig",
    "DersConfig",
    "ExpressionCaps",
    "ExpressionConfig",
    "ExpressionKinds",
    "GrefcocoInput",
    "ImageConfig",
    "InputConfig",
    "OodRule",
    "OrsgenConfig",
    "OverlayConfig",
    "RefcocoInput",
    "RegionConfig",
    "ReviewConfig",
    "Sa1bInput",
    "Sam2CleanConfig",
    "Sam2FilterConfig",
    "Sam2ReportConfig",
    "SplitConfig",
    "VerifySam2Config",
    "WriteConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "redact_argv",
    "redacted_config",
]
