"""Loading a config: bounded YAML, ``--set`` overrides, relative paths, secret-free errors.

The YAML file is untrusted text (a config downloaded with a dataset recipe,
a ``--set`` pasted from a chat), so it is parsed with bounds, and each
refusal is a ``ConfigError`` (one sentence, rc=2 at the CLI):

* the file must be UTF-8 and at most ``MAX_CONFIG_BYTES``;
* only the standard tags of YAML's core schema are accepted (``!!str``,
  ``!!int``, ``!!float``, ``!!bool``, ``!!null``, ``!!map``, ``!!seq``,
  ``!!timestamp``, ``!!merge``); ``!!python/object/apply`` and custom tags are
  refused before anything is constructed;
* nesting deeper than ``MAX_YAML_DEPTH`` is refused before Python's recursion
  limit is met;
* aliases may not make the document expand beyond ``MAX_YAML_NODES`` nodes
  (a "billion laughs" bomb is refused while it is composed, before any
  object or error message is built from it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from orsgen.schemas.config.base import ConfigError
from orsgen.schemas.config.redact import REDACTED, is_secret_name, redact_text
from orsgen.schemas.config.root import OrsgenConfig
from pydantic import ValidationError

#: Largest config file accepted, in bytes.
MAX_CONFIG_BYTES = 1024 * 1024
#: Deepest nesting of mappings and sequences accepted.
MAX_YAML_DEPTH = 64
#: Most nodes a document may expand to, aliases counted once per use.
MAX_YAML_NODES = 100_000

_STANDARD_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge")
)


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` with limits on tags, depth and alias expansion (checked while composing)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 (PyYAML hook)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"the YAML nests more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1}); "
                    "a config is a few levels deep, so this file is refused."
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:
            if node.tag not in _STANDARD_TAGS:
                raise ConfigError(
                    f"the YAML tag {node.tag[:60]!r} (line {node.start_mark.line + 1}) is not a standard tag; "
                    "configs hold plain strings, numbers, booleans, lists and mappings only."
                )
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            else:
                children = []
            # Children were composed first, so their (alias-expanded) sizes are known.
            size = 1 + sum(self._sizes.get(id(c), 1) for c in children)
            if size > MAX_YAML_NODES:
                raise ConfigError(
                    f"the YAML expands to more than {MAX_YAML_NODES} values through its aliases (&anchor / *alias); "
                    "this is refused as an alias bomb."
                )
            self._sizes[id(node)] = size
        return node


def safe_load_yaml(text: str | bytes, what: str = "the config") -> Any:
    """Parses YAML text with the bounds of this module.

    Args:
        text: the YAML document (bytes must be UTF-8).
        what: how the message names the source.

    Raises:
        ConfigError: the text is not UTF-8, not YAML, or breaks a bound.
    """
    if isinstance(text, bytes):
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{what} is {len(text)} bytes, above the limit of {MAX_CONFIG_BYTES}; a config is a few KB.")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{what} is not UTF-8 text (byte {err.start} is invalid); save it as UTF-8 YAML.") from None
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "it is not valid YAML"
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{what} is not valid YAML{where}: {redact_text(str(problem))[:200]}.") from None
    except RecursionError:
        raise ConfigError(f"{what} nests too deeply to parse; a config is a few levels deep.") from None
    finally:
        loader.dispose()


def _shown_value(value: Any, key: str) -> str:
    if is_secret_name(key):
        return REDACTED
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list) and len(value) > 8:
        return "[...]"
    try:
        shown = json.dumps(value, default=str)
    except (ValueError, RecursionError):
        shown = f"<{type(value).__name__}>"
    shown = redact_text(shown)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def _format_errors(err: ValidationError, data: Any) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in {"sa1b", "coco", "refcoco", "grefcoco"}))
        key = str(e["loc"][-1]) if e["loc"] else ""
        shown = _shown_value(e.get("input"), key)
        msg = redact_text(str(e["msg"]))
        lines.append(f"  {loc or '<root>'} = {shown}: {msg[:300]}")
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
        _set_dotted(data, key.strip(), safe_load_yaml(raw, f"the value of --set {key.strip()}"))
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
    if p.is_dir():
        raise ConfigError(f"config path {str(p)!r} is a folder; pass the path of a YAML config file such as configs/sa1b.yaml.")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML config such as configs/sa1b.yaml (or run `orsgen demo`).")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({err.strerror}); check its permissions.") from None
    data = safe_load_yaml(raw, f"config file {str(p)!r}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}.")
    data = apply_overrides(data, overrides or [])
    written: dict[str, str] = {}
    data = _resolve_relative_paths(data, p.parent, written)
    cfg = config_from_dict(data)
    _remember_written_paths(cfg, written)
    return cfg


def _remember_written_paths(cfg: OrsgenConfig, written: dict[str, str]) -> None:
    # Private attributes (not fields): they never change the config's
    # validation, and travel with the config when Beam pickles it.
    cfg._written_paths = dict(written)
    for inp in cfg.inputs:
        inp._written_paths = dict(written)
    # Benchmark refs in rejects and the matches file are shown as written too.
    cfg.decontaminate._written_paths = dict(written)


_PATH_KEYS = ("shards", "annotations", "images", "refs", "instances")


def _is_url(s: str) -> bool:
    return "://" in s


def _resolve_relative_paths(data: dict[str, Any], base: Path, written: dict[str, str] | None = None) -> dict[str, Any]:
    """Resolves relative input paths against ``base``; records resolved -> written in ``written``."""
    record = written if written is not None else {}

    def resolve(v: Any) -> Any:
        if not isinstance(v, str) or not v or _is_url(v) or Path(v).is_absolute() or "\x00" in v:
            return v
        resolved = str((base / v).resolve())
        record[resolved] = v
        return resolved

    cap = data.get("caption")
    if isinstance(cap, dict) and isinstance(cap.get("prompts"), str):
        cap["prompts"] = resolve(cap["prompts"])
    expr = data.get("expressions")
    if isinstance(expr, dict):
        for key in ("templates", "vocabulary"):
            if isinstance(expr.get(key), str):
                expr[key] = resolve(expr[key])
    rev = data.get("review")
    if isinstance(rev, dict) and isinstance(rev.get("decisions"), str):
        rev["decisions"] = resolve(rev["decisions"])
    dec = data.get("decontaminate")
    if isinstance(dec, dict):
        # Benchmark files, like inputs, are relative to the YAML file's folder.
        if isinstance(dec.get("index"), str):
            dec["index"] = resolve(dec["index"])
        for src in dec.get("sources") or []:
            for k in ("path", "images", "instances"):
                if isinstance(src, dict) and isinstance(src.get(k), str):
                    src[k] = resolve(src[k])
    for inp in data.get("inputs") or []:
        if not isinstance(inp, dict):
            continue
        for k in _PATH_KEYS:
            if k in inp:
                v = inp[k]
                inp[k] = [resolve(s) for s in v] if isinstance(v, list) else resolve(v)
    return data
