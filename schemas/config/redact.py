"""Redaction of secrets wherever text leaves the process.

Two ways a secret is recognised:

* **by name**: a mapping key or command-line flag named ``key``, or whose
  words include api/access/secret/private/auth... ``key``, apikey, token, secret, password, passwd, authorization, credential(s),
  cookie or bearer (``api_key``, ``Authorization``, ``X-Api-Key``,
  ``--hf-token``); names of environment variables (``api_key_env``, any key
  ending in ``_env``) are kept, since they are not secrets; URL credentials
  (``https://user:password@host``), ``Bearer <token>``, ``hf_...`` and
  ``sk-...`` key shapes are masked too, wherever they were pasted;
* **by value**: the current values of the environment variables that hold
  secrets: ``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, the variable named by
  ``caption.backend.api_key_env`` (registered with ``register_secret_env``
  and passed on to worker processes through ``ORSGEN_SECRET_ENV``), and any
  variable whose name itself is secret-like (``*_API_KEY``, ``*_TOKEN``...).
  Those values are scrubbed from any message, whatever surrounds them.

``redact_text`` is what reject messages (``Reject.__post_init__``), config
errors, the CLI's error lines and log records go through;
``redacted_config`` is what the manifest records.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orsgen.schemas.config.root import OrsgenConfig


#: Flags whose value is a secret (vLLM / SGLang ``--api-key``, hub tokens).
SECRET_FLAGS = ("--api-key", "--api_key", "--token", "--hf-token", "--hf_token", "-k", "--password", "--secret")
REDACTED = "***"
#: Environment variable listing extra secret-holding variable names (comma-separated).
SECRET_ENV_LIST = "ORSGEN_SECRET_ENV"
#: Environment variables whose values are always scrubbed.
ALWAYS_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "VLLM_API_KEY")
#: Secret values shorter than this are not scrubbed by value (they would mask ordinary words and digits).
MIN_SECRET_CHARS = 6

_KEY_QUALIFIERS = frozenset({"api", "access", "secret", "private", "auth", "client", "signing", "session", "subscription"})
_SECRET_WORDS = frozenset(
    {"apikey", "token", "secret", "password", "passwd", "authorization", "credential", "credentials", "cookie", "bearer"}
)
# Quantifiers are bounded so that no pattern backtracks quadratically on a
# long hostile message (every reject message goes through these).
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]{0,30}://)(?P<cred>[^/@\s:]{1,256}(?::[^/@\s]{0,256})?)@")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s{1,8}[A-Za-z0-9._~+/=-]{4,}")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
# OpenAI-style keys (sk-..., sk-proj-...), whatever field they were pasted into.
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")
_INLINE = re.compile(
    r"(?i)(?P<name>[\"']?\b[A-Za-z0-9_.-]{0,40}(?:api[_-]?key|token(?!s)|secret|password|passwd|authorization)[\"']?\s{0,8}[:=]\s{0,8})"
    r"(?P<value>\"[^\"]{0,4096}\"|'[^']{0,4096}'|[^\s,;}\]]{1,4096})"
)


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether a key, header or flag name holds a secret (``api_key``: yes; ``api_key_env``, ``max_tokens``: no)."""
    words = _words(name)
    if not words or words[-1] == "env":
        return False
    if words == ["key"] or any(w == "key" and i > 0 and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words)):
        return True
    return any(w in _SECRET_WORDS for w in words)


def register_secret_env(name: str | None) -> None:
    """Marks an environment variable as holding a secret, here and in worker processes.

    The name is appended to ``ORSGEN_SECRET_ENV``, which child processes (the
    multi-processing direct runner's workers, a managed server) inherit.
    """
    if not name:
        return
    names = [n for n in os.environ.get(SECRET_ENV_LIST, "").split(",") if n]
    if name not in names:
        os.environ[SECRET_ENV_LIST] = ",".join([*names, name])


#: ``(environment snapshot, secret values)`` of the last ``secret_values`` call.
_SECRETS_SEEN: tuple[dict[Any, Any] | None, tuple[str, ...]] = (None, ())


def secret_values() -> list[str]:
    """The current values of every secret-holding environment variable, longest first.

    Every reject message is redacted, so this runs thousands of times per
    run; the answer is kept with a snapshot of the process environment and
    reused while the environment is unchanged (a dict comparison in C), so a
    variable set, changed or removed later is seen at once.
    """
    global _SECRETS_SEEN
    # os.environ's own mapping (bytes on POSIX): copying and comparing it
    # costs no per-variable decoding. Without it, scan every time.
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        return _scan_secret_values()
    seen, values = _SECRETS_SEEN
    if seen is not None and seen == data:
        return list(values)
    snapshot = dict(data)
    found = _scan_secret_values()
    _SECRETS_SEEN = (snapshot, tuple(found))
    return found


def _scan_secret_values() -> list[str]:
    """``secret_values`` read from the environment (no reuse)."""
    names = set(ALWAYS_SECRET_ENV) | {n for n in os.environ.get(SECRET_ENV_LIST, "").split(",") if n}
    values = {os.environ.get(n, "") for n in names}
    values |= {v for k, v in os.environ.items() if is_secret_name(k) and k != SECRET_ENV_LIST}
    return sorted((v for v in values if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with secret values, URL credentials, bearer tokens and ``key=value`` secrets masked."""
    if not text:
        return text
    for v in secret_values():
        if v in text:
            text = text.replace(v, REDACTED)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _HF_TOKEN.sub("hf_" + REDACTED, text)
    text = _SK_KEY.sub("sk-" + REDACTED, text)
    return _INLINE.sub(lambda m: f"{m['name']}{REDACTED}", text)


def redact_argv(argv: list[str] | tuple[str, ...]) -> list[str]:
    """A command line safe to log or publish: values of secret flags become ``***``.

    Handles ``--api-key KEY``, ``--api-key=KEY``, ``"--api-key KEY"`` as one
    argument, and secret values or URL credentials anywhere in an argument.
    Prefer passing keys through the environment (e.g. ``VLLM_API_KEY``,
    inherited by the server).
    """
    out: list[str] = []
    hide_next = False
    for a in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        head, space, _rest = a.strip().partition(" ")
        if space and (head in SECRET_FLAGS or (head.startswith("--") and is_secret_name(head))):
            out.append(f"{head} {REDACTED}")  # "--api-key KEY" given as one argument
            continue
        flag, eq, _value = a.partition("=")
        if flag in SECRET_FLAGS or (flag.startswith("--") and " " not in flag and is_secret_name(flag)):
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(a)
                hide_next = True
            continue
        out.append(redact_text(a))
    return out


def redact_value(value: Any, key: str = "") -> Any:
    """A JSON-like value with secrets masked: by key name at any depth, URL credentials and secret values in strings."""
    if key and is_secret_name(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(a, str) for a in value) and any(a.startswith("-") for a in value):
            return redact_argv(list(value))
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redacted_config(cfg: "OrsgenConfig") -> dict[str, Any]:
    """The resolved config as JSON values, with secret values masked.

    This is what the manifest (and so a published dataset card) records:
    every value under a secret-like key (``api_key``, ``Authorization``... in
    ``extra_body`` too) becomes ``***``, ``caption.backend.server_env``
    values all become ``***``, secret flags of ``server_command`` are masked
    (``--api-key X``, ``--api-key=X``, ``"--api-key X"``, ``-k X``), URL
    credentials (``user:password@``) are masked and the values of secret
    environment variables are scrubbed from every string. Environment
    variable NAMES (such as ``api_key_env``) are kept; they are not secrets.
    Input paths appear as written in the config (see ``portable_dump``). The
    config sha256 is computed on the unredacted config, which does not reveal
    the values.
    """
    from orsgen.schemas.config.root import portable_dump

    data = portable_dump(cfg)
    backend = (data.get("caption") or {}).get("backend") or {}
    if backend.get("server_env"):
        backend["server_env"] = {k: REDACTED for k in backend["server_env"]}
    return redact_value(data)


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs secrets from a record's message (installed on handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        clean = redact_text(msg)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        return True


_FACTORY_INSTALLED = False


def install_log_redaction() -> None:
    """Scrubs secrets from every log record this process creates, on any logger.

    A record factory sees every record before any handler, including records
    of libraries (Beam, urllib3, huggingface_hub) and exceptions they log.
    """
    global _FACTORY_INSTALLED
    if _FACTORY_INSTALLED:
        return
    previous = logging.getLogRecordFactory()
    scrub = RedactingFilter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        scrub.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _FACTORY_INSTALLED = True
