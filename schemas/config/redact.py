"""Redaction of secrets in config values and command lines, for logs and the manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orsgen.schemas.config.root import OrsgenConfig


#: Flags whose value is a secret (vLLM / SGLang ``--api-key``, hub tokens).
SECRET_FLAGS = ("--api-key", "--api_key", "--token", "--hf-token", "--hf_token")
REDACTED = "***"


def redact_argv(argv: list[str] | tuple[str, ...]) -> list[str]:
    """A command line safe to log or publish: values of secret flags become ``***``.

    Handles ``--api-key KEY`` and ``--api-key=KEY``. Prefer passing keys
    through the environment (e.g. ``VLLM_API_KEY``, inherited by the server).
    """
    out: list[str] = []
    hide_next = False
    for a in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _value = a.partition("=")
        if flag in SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(a)
                hide_next = True
            continue
        out.append(a)
    return out


def redacted_config(cfg: "OrsgenConfig") -> dict[str, Any]:
    """The resolved config as JSON values, with secret values masked.

    This is what the manifest (and so a published dataset card) records:
    ``caption.backend.server_env`` values and the values of secret flags in
    ``server_command`` become ``***``. Environment variable NAMES (such as
    ``api_key_env``) are kept; they are not secrets. The config sha256 is
    still computed on the full config, which does not reveal the values.
    """
    data = cfg.model_dump(mode="json")
    backend = (data.get("caption") or {}).get("backend") or {}
    if backend.get("server_env"):
        backend["server_env"] = {k: REDACTED for k in backend["server_env"]}
    if backend.get("server_command"):
        backend["server_command"] = redact_argv(backend["server_command"])
    return data
