"""orsgen: build open-world referring-segmentation datasets with Apache Beam.

The public API is importable from here; each name is loaded on first use, so
``import orsgen`` pulls in neither Beam nor torch:

    from orsgen import load_config, run_pipeline             # build
    from orsgen import WebDatasetSamples, ParquetSamples     # train (torch)
    from orsgen import webdataset_features                   # HF datasets
    from orsgen import export_dataset, evaluate_files        # trainers' formats, metrics
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("orsgen")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

#: public name -> the module that defines it.
_PUBLIC = {
    # config and build
    "OrsgenConfig": "orsgen.schemas.config",
    "ConfigError": "orsgen.schemas.config",
    "load_config": "orsgen.schemas.config",
    "config_from_dict": "orsgen.schemas.config",
    "run_pipeline": "orsgen.pipelines.run",
    "build_pipeline": "orsgen.pipelines.build",
    "generate_demo_inputs": "orsgen.pipelines.demo_data",
    # records and the Parquet schema
    "ImageExample": "orsgen.schemas.records",
    "Instance": "orsgen.schemas.records",
    "Sample": "orsgen.schemas.records",
    "Reject": "orsgen.schemas.records",
    "EXAMPLE_SCHEMA": "orsgen.schemas.arrow",
    "REJECT_SCHEMA": "orsgen.schemas.arrow",
    # reading, loading and using a finished dataset
    "webdataset_features": "orsgen.stages.dataset.features",
    "WebDatasetSamples": "orsgen.stages.dataset.loader",
    "ParquetSamples": "orsgen.stages.dataset.loader",
    "collate_lists": "orsgen.stages.dataset.loader",
    "load_manifest": "orsgen.stages.dataset.read",
    "iter_rows": "orsgen.stages.dataset.read",
    "export_dataset": "orsgen.stages.dataset.export",
    "evaluate_files": "orsgen.stages.dataset.evaluate",
    "write_preview": "orsgen.stages.dataset.preview",
    "prepare_hub_folder": "orsgen.stages.dataset.publish",
    "upload_hub_folder": "orsgen.stages.dataset.publish",
    # VLM backends, prompts and parsers of the caption stage
    "load_prompts": "orsgen.stages.caption.prompts",
    "make_request": "orsgen.stages.caption.prompts",
    "model_input_size": "orsgen.stages.caption.prompts",
    "to_model_box": "orsgen.stages.caption.prompts",
    "from_model_box": "orsgen.stages.caption.prompts",
    "format_box": "orsgen.stages.caption.prompts",
    "OpenAICompatibleCaptioner": "orsgen.stages.caption.backends",
    "ManagedServerCaptioner": "orsgen.stages.caption.backends",
    "TransformersCaptioner": "orsgen.stages.caption.backends",
    "CachingCaptioner": "orsgen.stages.caption.cache",
    "ResponseCache": "orsgen.stages.caption.cache",
    "parse_grounding": "orsgen.stages.caption.parse",
    "parse_description": "orsgen.stages.caption.parse",
    "parse_verification": "orsgen.stages.caption.parse",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    # PEP 562: import the defining module only when a name is first used, so
    # that `import orsgen` stays light and torch loads only for the loaders.
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'orsgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from orsgen.pipelines.build import build_pipeline
    from orsgen.pipelines.demo_data import generate_demo_inputs
    from orsgen.pipelines.run import run_pipeline
    from orsgen.schemas.arrow import EXAMPLE_SCHEMA, REJECT_SCHEMA
    from orsgen.schemas.config import ConfigError, OrsgenConfig, config_from_dict, load_config
    from orsgen.schemas.records import ImageExample, Instance, Reject, Sample
    from orsgen.stages.caption.backends import ManagedServerCaptioner, OpenAICompatibleCaptioner, TransformersCaptioner
    from orsgen.stages.caption.cache import CachingCaptioner, ResponseCache
    from orsgen.stages.caption.parse import parse_description, parse_grounding, parse_verification
    from orsgen.stages.caption.prompts import format_box, from_model_box, load_prompts, make_request, model_input_size, to_model_box
    from orsgen.stages.dataset.evaluate import evaluate_files
    from orsgen.stages.dataset.export import export_dataset
    from orsgen.stages.dataset.features import webdataset_features
    from orsgen.stages.dataset.loader import ParquetSamples, WebDatasetSamples, collate_lists
    from orsgen.stages.dataset.preview import write_preview
    from orsgen.stages.dataset.publish import prepare_hub_folder, upload_hub_folder
    from orsgen.stages.dataset.read import iter_rows, load_manifest
