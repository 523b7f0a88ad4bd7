"""Shared base of the config models and the config error."""

from __future__ import annotations


from pydantic import BaseModel, ConfigDict, PrivateAttr


class ConfigError(ValueError):
    """The config is invalid; the message names the key, the value and the fix."""


class ConfigModel(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Paths that load_config resolved against the YAML file's folder, mapped
    # back to the text the file holds (empty for a config built in code):
    # records, reject keys and the manifest show paths as written, so that
    # the same inputs under another folder give the same bytes.
    _written_paths: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def written_paths(self) -> dict[str, str]:
        """Resolved path -> the relative path the config file wrote."""
        return self._written_paths


_GLOB_CHARS = "*?["


def _fixed_prefix(path: str) -> str:
    """The part of a path before its first glob character, cut at a ``/`` ("" when there is none)."""
    cut = min((path.index(c) for c in _GLOB_CHARS if c in path), default=-1)
    if cut < 0:
        return path.rstrip("/")
    head = path[:cut]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def display_path(path: str, written: dict[str, str]) -> str:
    """A path as the config wrote it, for records (``uri``), reject keys and the manifest.

    ``written`` maps paths that ``load_config`` resolved against the config
    file's folder back to the relative text of the file. A path equal to one
    of them, or under its folder part (before any glob character), is shown
    with that relative text; anything else (absolute paths the file wrote,
    URLs) is returned unchanged.

    Args:
        path: a resolved path or URL, possibly with a ``#member`` suffix.
        written: ``ConfigModel.written_paths``.
    """
    best = ""
    for resolved in written:
        if len(resolved) > len(best) and (path == resolved or path.startswith(_fixed_prefix(resolved) + "/")):
            best = resolved
    if not best:
        return path
    if path == best:
        return written[best]
    rest = path[len(_fixed_prefix(best)) :]
    as_written = _fixed_prefix(written[best])
    return as_written + rest if as_written else rest.lstrip("/")
