"""Transient infrastructure errors: tell them from bad data, retry them, then fail loudly.

An object store that resets a connection, times out or answers 5xx says
nothing about the data: such an error is retried here with exponential
backoff, and when the retries run out ``TransientIOError`` is raised so that
the Beam bundle fails and the runner retries it (Dataflow: four times, then
the job fails with the message). Only data that is really bad becomes a
reject. The classes below follow what gcsfs, s3fs/botocore and aiohttp
raise after their own internal retries; those libraries are optional, so
they are recognised by class name and module, never imported here.

``ResilientFile`` applies the same rule to a stream: a read that fails with
a transient error reopens the URL and seeks back to where the read began, so
a connection reset in the middle of an 11 GB SA-1B tar costs one retried
read, not the rest of the shard.
"""

from __future__ import annotations

import errno
import io
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The sleep between retries; tests replace it to run without waiting.
_sleep: Callable[[float], None] = time.sleep

#: errno values of a network or a busy remote, never of bad data. EBUSY and
#: EREMOTEIO are s3fs's translations of 503/SlowDown and 500.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ETIMEDOUT", "EPIPE", "EHOSTUNREACH",
        "ENETUNREACH", "ENETDOWN", "EAGAIN", "EBUSY", "EREMOTEIO",
    )
    if hasattr(errno, name)
)

#: HTTP statuses worth another try (gcsfs retries the same set internally).
TRANSIENT_STATUS = frozenset({408, 429, 500, 501, 502, 503, 504})

# Exception classes of optional libraries, by (module prefix, class name):
# matched along the MRO so subclasses count too.
_TRANSIENT_CLASSES = frozenset({
    # aiohttp: connection errors (reset, disconnected, refused) and cut payloads.
    ("aiohttp", "ClientConnectionError"),
    ("aiohttp", "ClientPayloadError"),
    # botocore: reads cut short, connections that failed, unparsable answers.
    ("botocore", "HTTPClientError"),
    ("botocore", "ConnectionError"),
    ("botocore", "ResponseParserError"),
    ("botocore", "ResponseStreamingError"),
    # urllib3 / requests (gcsfs maps a 502 to requests' ProxyError).
    ("urllib3", "ProtocolError"),
    ("urllib3", "IncompleteRead"),
    ("urllib3", "TimeoutError"),
    ("requests", "ConnectionError"),
    ("requests", "Timeout"),
    ("requests", "ChunkedEncodingError"),
    ("requests", "ContentDecodingError"),
    # google-auth: a token refresh that failed on the network.
    ("google", "TransportError"),
})

# Never transient, even when they are OSErrors: the object is missing, the
# credentials are wrong, the path is a folder.
_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


class TransientIOError(RuntimeError):
    """A transient I/O error that outlived its retries: the bundle fails and the runner retries it.

    A ``RuntimeError``, not an ``OSError``, so that readers which turn
    ``OSError`` into rejects (a corrupt shard) let it through.
    """


def _named(err: BaseException, names: frozenset[tuple[str, str]]) -> bool:
    for cls in type(err).__mro__:
        mod = cls.__module__.split(".", 1)[0]
        if (mod, cls.__name__) in names:
            return True
    return False


def _status(err: BaseException) -> int | None:
    """An HTTP status carried by an exception (aiohttp ``status``, gcsfs ``code``, botocore response)."""
    for attr in ("status", "code", "status_code"):
        v = getattr(err, attr, None)
        if isinstance(v, int) and 100 <= v <= 599:
            return v
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def is_transient(err: BaseException) -> bool:
    """Whether an exception is a passing infrastructure failure rather than bad data.

    Transient: timeouts, dropped / refused / reset connections, the errnos of
    ``TRANSIENT_ERRNOS``, HTTP 408/429/5xx, and the network errors of aiohttp,
    botocore, urllib3, requests and google-auth. Permanent: missing objects,
    denied access, anything else (a corrupt tar, bad JSON).

    Args:
        err: the exception.

    Returns:
        True when retrying may succeed.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    # Follow the cause chain: fsspec and tarfile sometimes wrap the network error.
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, TransientIOError):
            return False  # already retried; do not multiply the attempts
        if isinstance(e, _PERMANENT):
            return False
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        status = _status(e)
        if status is not None:
            return status in TRANSIENT_STATUS
        if _named(e, _TRANSIENT_CLASSES):
            return True
        e = e.__cause__ or e.__context__
    return False


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """Sleep before retry ``attempt`` (1-based): exponential with full jitter."""
    return random.uniform(0, min(max_s, initial_s * (2 ** (attempt - 1))))


def retry_transient(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 4,
    initial_s: float = 1.0,
    max_s: float = 30.0,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Calls ``fn``; retries transient errors with backoff; re-raises permanent ones unchanged.

    Args:
        fn: the operation.
        what: what it does, for the error ("opening gs://b/sa_000000.tar").
        attempts: most calls in all (gcsfs and s3fs already retry inside, so keep it small).
        initial_s: first backoff (doubled per retry, with jitter).
        max_s: backoff cap.
        sleep: the sleep function (None: ``_sleep``, which tests replace).

    Returns:
        What ``fn`` returns.

    Raises:
        TransientIOError: the last attempt still failed transiently.
        Exception: any permanent error of ``fn``, unchanged.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise TransientIOError(
                    f"{what} failed {attempts} times with transient errors, the last: {type(err).__name__}: "
                    f"{str(err)[:300]}; the bundle fails so that the runner retries it. If this persists, "
                    "check the network path to the object store and its quotas."
                ) from err
            delay = backoff_s(attempt, initial_s, max_s)
            log.warning("%s: transient %s (attempt %d of %d); retrying in %.1f s", what, type(err).__name__,
                        attempt, attempts, delay)
            (sleep or _sleep)(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class ResilientFile(io.RawIOBase):
    """A read-only, forward-reading file that survives transient errors by reopening and seeking.

    ``tarfile``'s stream mode reads it front to back; a read that fails
    transiently reopens the object (``opener()``), seeks to the position the
    read started at and reads again, with ``retry_transient``'s backoff. It
    needs a seekable underlying file (local files, gcsfs, s3fs and HTTP with
    range requests are); when a reopened file cannot seek, the error is raised.

    Args:
        opener: returns a fresh binary file object positioned at 0.
        what: the URL, for messages.
        attempts: most tries per read or open.
        initial_s: first backoff.
        max_s: backoff cap.
        sleep: the sleep function (tests pass a fake).
    """

    def __init__(
        self,
        opener: Callable[[], Any],
        what: str,
        *,
        attempts: int = 4,
        initial_s: float = 1.0,
        max_s: float = 30.0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__()
        self._opener = opener
        self._what = what
        self._kw: dict[str, Any] = dict(attempts=attempts, initial_s=initial_s, max_s=max_s, sleep=sleep)
        self._pos = 0
        self.reopened = 0
        # Opening may fail permanently (a missing object): that propagates as is.
        self._f = retry_transient(opener, what=f"opening {what}", **self._kw)

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _reopen(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - the broken handle's close may fail too
            pass
        f = self._opener()
        if self._pos:
            f.seek(self._pos)
        self._f = f
        self.reopened += 1

    def read(self, size: int = -1) -> bytes:
        first = True

        def attempt() -> bytes:
            nonlocal first
            if not first:
                self._reopen()
            first = False
            return self._f.read(size)

        data = retry_transient(attempt, what=f"reading {self._what} at byte {self._pos}", **self._kw)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()
