"""Loading a config: YAML, ``--set`` overrides, relative paths; redaction of secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from orsgen.schemas.config.base import ConfigError
from orsgen.schemas.config.root import OrsgenConfig
from pydantic import ValidationError


def _format_errors(err: ValidationError, data: Any) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in {"sa1b", "coco", "refcoco", "grefcoco"}))
        value = e.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 120:
            shown = shown[:117] + "..."
        lines.append(f"  {loc or '<root>'} = {shown}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines) + "\nFix these keys in the YAML file or the --set overrides."


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"--set {dotted}: index {idx} is past the end of a list of {len(node)}.")
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt_is_index else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"--set {dotted}: index {idx} is past the end of a list of {len(node)}.")
        node[idx] = value
    else:
        node[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``key.sub=value`` overrides; values are parsed as YAML scalars.

    Args:
        data: the raw config mapping (modified in place and returned).
        overrides: strings such as ``regions.min_area_frac=0.01`` or
            ``inputs.0.max_images=10``.

    Returns:
        The updated mapping.

    Raises:
        ConfigError: an override is not of the form ``key=value``.
    """
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r} is not of the form key=value (e.g. regions.min_area_frac=0.01).")
        key, raw = ov.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def config_from_dict(data: dict[str, Any]) -> OrsgenConfig:
    """Validates a config mapping.

    Raises:
        ConfigError: naming every bad key and value.
    """
    try:
        return OrsgenConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, data)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> OrsgenConfig:
    """Loads and validates a YAML config file.

    Relative input paths in the file are resolved against the file's folder.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings applied before validation.

    Returns:
        The validated config.

    Raises:
        ConfigError: the file is missing, not YAML, or invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML config such as configs/sa1b.yaml (or run `orsgen demo`).")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}.")
    data = apply_overrides(data, overrides or [])
    data = _resolve_relative_paths(data, p.parent)
    return config_from_dict(data)


_PATH_KEYS = ("shards", "annotations", "images", "refs", "instances")


def _is_url(s: str) -> bool:
    return "://" in s


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    cap = data.get("caption")
    if isinstance(cap, dict) and isinstance(cap.get("prompts"), str):
        t = cap["prompts"]
        if not _is_url(t) and not Path(t).is_absolute():
            cap["prompts"] = str((base / t).resolve())
    expr = data.get("expressions")
    if isinstance(expr, dict) and isinstance(expr.get("templates"), str):
        t = expr["templates"]
        if not _is_url(t) and not Path(t).is_absolute():
            expr["templates"] = str((base / t).resolve())
    dec = data.get("decontaminate")
    if isinstance(dec, dict):
        # Benchmark files, like inputs, are relative to the YAML file's folder.
        if isinstance(dec.get("index"), str) and not _is_url(dec["index"]) and not Path(dec["index"]).is_absolute():
            dec["index"] = str((base / dec["index"]).resolve())
        for src in dec.get("sources") or []:
            for k in ("path", "images", "instances"):
                v = src.get(k) if isinstance(src, dict) else None
                if isinstance(v, str) and not _is_url(v) and not Path(v).is_absolute():
                    src[k] = str((base / v).resolve())
    for inp in data.get("inputs") or []:
        if not isinstance(inp, dict):
            continue
        for k in _PATH_KEYS:
            v = inp.get(k)
            if isinstance(v, str) and not _is_url(v) and not Path(v).is_absolute():
                inp[k] = str((base / v).resolve())
            elif isinstance(v, list):
                inp[k] = [
                    str((base / s).resolve()) if isinstance(s, str) and not _is_url(s) and not Path(s).is_absolute() else s
                    for s in v
                ]
    return data
