"""The review server: a small standard-library HTTP server on 127.0.0.1.

Routes (everything else is a 404; a path holding ``..`` is refused with 403)::

    GET  /                 the page (static/index.html)
    GET  /app.js /app.css  its script and style
    GET  /api/state        reviewer, splits, reasons, progress and the session token
    GET  /api/samples      every sample of the review (id, split, kind, expression, targets, verdict)
    GET  /api/image/<i>    sample i's image as JPEG, with its targets drawn (?overlay=0: plain)
    POST /api/decision     {"i", "sample_id", "verdict", "reason"} -> saved before the reply

No path is ever built from a request or from the data: samples are found by
their position in the review and checked against their id, and the static
files are a fixed table. The page renders every text with ``textContent``
and the Content-Security-Policy forbids inline script, so an expression
holding ``<script>`` shows as text. A POST must carry the session token (only
a page served by this server can read it) and every request must name this
server in its Host header, which shuts out other web sites and DNS rebinding.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from orsgen.schemas.records import ReviewDecision, Verdict
from orsgen.stages.dataset.review.samples import ReviewIndex
from orsgen.stages.dataset.review.store import DecisionLog, ReviewStoreError
from orsgen.stages.screening import REASON_CODES, decisions_path, latest_decisions, read_decisions

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
MAX_BODY_BYTES = 16 * 1024
MAX_REASON_CHARS = 500
_IMAGE_RE = re.compile(r"^/api/image/(\d{1,9})$")


class ReviewSession:
    """The state one server shares between its request threads.

    Args:
        index: the samples under review.
        log: this session's decisions file.
        earlier: verdicts already in ``DIR/_review/decisions.parquet`` (any reviewer).
    """

    def __init__(self, index: ReviewIndex, log: DecisionLog, earlier: list[ReviewDecision] | None = None) -> None:
        self.index = index
        self.log = log
        self.token = secrets.token_urlsafe(24)
        self._lock = threading.Lock()
        wanted = set(index.by_id)
        self.latest = {k: v for k, v in latest_decisions(earlier or []).items() if k in wanted}

    def progress(self) -> dict[str, Any]:
        with self._lock:
            c = Counter(d.verdict for d in self.latest.values())
        return {"total": len(self.index), "decided": sum(c.values()), **{str(v): c.get(str(v), 0) for v in Verdict}}

    def verdict_of(self, sample_id: str) -> dict[str, str] | None:
        d = self.latest.get(sample_id)
        return None if d is None else {"verdict": d.verdict, "reason": d.reason, "reviewer": d.reviewer}

    def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validates and saves one verdict; raises ValueError with a sentence for the page."""
        i, sid = body.get("i"), body.get("sample_id")
        verdict, reason = body.get("verdict"), body.get("reason", "")
        if not isinstance(i, int) or not (0 <= i < len(self.index)):
            raise ValueError("unknown sample position; reload the page.")
        item = self.index.items[i]
        if sid != item.sample.sample_id:
            raise ValueError("the sample id does not match its position; reload the page.")
        if verdict not in tuple(Verdict):
            raise ValueError(f"verdict must be one of {[str(v) for v in Verdict]}.")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise ValueError(f"the reason must be text of at most {MAX_REASON_CHARS} characters.")
        reason = " ".join(reason.split())  # no control characters or newlines in the store
        if verdict == Verdict.REJECT and not reason:
            raise ValueError("a rejection needs a reason: pick one (1-5) or type one.")
        if verdict != Verdict.REJECT:
            reason = ""
        d = self.log.add(item.sample.sample_id, verdict, reason, split=item.image.split, kind=item.sample.kind, template=item.sample.template)
        with self._lock:
            self.latest[d.sample_id] = d
        return {"ok": True, "decision": self.verdict_of(d.sample_id), "progress": self.progress()}


class ReviewHandler(BaseHTTPRequestHandler):
    """Serves one request; the session hangs on the server (``server.session``)."""

    server_version = "orsgen-review"
    sys_version = ""

    # --------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, ctype: str, *, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "private, max-age=300" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        # <, > and & only occur inside JSON strings: escaping them means no
        # response ever holds markup, even if something sniffs it as HTML.
        text = json.dumps(obj, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        self._send(status, text.encode("ascii"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"ok": False, "error": message})

    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts  # type: ignore[attr-defined]
        return allowed is None or (self.headers.get("Host") or "").lower() in allowed

    def _path(self) -> str | None:
        """The request path, or None (after a 403) when it tries to leave the review root."""
        # Not urlsplit: it would read "//etc/passwd" as a host and a path.
        path = unquote(self.path.split("?", 1)[0].split("#", 1)[0])
        if ".." in path or "\\" in path or "\x00" in path or "//" in path:
            self._error(HTTPStatus.FORBIDDEN, "refused: the path leaves the review root.")
            return None
        return path

    # --------------------------------------------------------------- routes
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "refused: unexpected Host header.")
        path = self._path()
        if path is None:
            return
        session: ReviewSession = self.server.session  # type: ignore[attr-defined]
        if path in STATIC:
            name, ctype = STATIC[path]
            body = resources.files("orsgen.stages.dataset.review").joinpath("static", name).read_bytes()
            return self._send(HTTPStatus.OK, body, ctype)
        if path == "/api/state":
            return self._json(
                HTTPStatus.OK,
                {
                    "reviewer": session.log.reviewer,
                    "root": str(session.index.root),
                    "splits": session.index.splits,
                    "reasons": [{"code": k, "label": v} for k, v in REASON_CODES.items()],
                    "progress": session.progress(),
                    "token": session.token,
                    "decisions_folder": session.log.folder,
                },
            )
        if path == "/api/samples":
            rows = []
            for item in session.index.items:
                row = session.index.summary(item)
                row["decision"] = session.verdict_of(item.sample.sample_id)
                rows.append(row)
            return self._json(HTTPStatus.OK, {"samples": rows})
        m = _IMAGE_RE.match(path)
        if m:
            i = int(m.group(1))
            if i >= len(session.index):
                return self._error(HTTPStatus.NOT_FOUND, "no such sample.")
            overlay = parse_qs(urlsplit(self.path).query).get("overlay", ["1"])[0] != "0"
            try:
                body = session.index.render(session.index.items[i], overlay=overlay)
            except (OSError, ValueError) as err:
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not read or draw the image: {err}")
            return self._send(HTTPStatus.OK, body, "image/jpeg", cache=True)
        return self._error(HTTPStatus.NOT_FOUND, "not found.")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "refused: unexpected Host header.")
        path = self._path()
        if path is None:
            return
        if path != "/api/decision":
            return self._error(HTTPStatus.NOT_FOUND, "not found.")
        session: ReviewSession = self.server.session  # type: ignore[attr-defined]
        if not secrets.compare_digest(self.headers.get("X-Orsgen-Token", ""), session.token):
            return self._error(HTTPStatus.FORBIDDEN, "refused: missing or wrong session token; reload the page.")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not (0 < n <= MAX_BODY_BYTES):
            return self._error(HTTPStatus.BAD_REQUEST, f"the body must be JSON of at most {MAX_BODY_BYTES} bytes.")
        try:
            body = json.loads(self.rfile.read(n))
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object.")
            out = session.decide(body)
        except ReviewStoreError as err:
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(err))
        except (ValueError, UnicodeDecodeError) as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        return self._json(HTTPStatus.OK, out)


class ReviewServer(ThreadingHTTPServer):
    """A threading HTTP server holding one ``ReviewSession``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], session: ReviewSession, *, verbose: bool = False) -> None:
        super().__init__(address, ReviewHandler)
        self.session = session
        self.verbose = verbose
        host, port = self.server_address[:2]
        # On loopback only this server's own names are accepted (no DNS
        # rebinding); a user who binds another address chose to be reached by
        # whatever name the network uses, and the session token still guards writes.
        loopback = str(host).startswith("127.") or host in ("localhost", "::1")
        names = {str(host), "localhost", "127.0.0.1"}
        self.allowed_hosts: set[str] | None = {f"{h}:{port}".lower() for h in names} if loopback else None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(
    root: str,
    *,
    splits: list[str] | None = None,
    reviewer: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    shard: tuple[int, int] | None = None,
    kinds: list[str] | None = None,
    verbose: bool = False,
) -> ReviewServer:
    """Builds the review server of ``root`` (not started: call ``serve_forever``).

    Args:
        root: the output folder (``DIR``); decisions go to ``DIR/_review/``.
        splits: splits to review (None: all).
        reviewer: the reviewer's name, recorded with every verdict.
        host: the address to bind; 127.0.0.1 keeps the page on this machine.
        port: the port (0: any free port).
        shard: ``(k, n)``: review only bucket ``k`` of ``n`` (disjoint for n reviewers).
        kinds: only these sample kinds.
        verbose: log every request.

    Raises:
        ReviewError: nothing to review.
        ReviewStoreError: an invalid reviewer name.
        DecisionsError: an earlier decisions part cannot be read.
    """
    log = DecisionLog(root, reviewer)
    index = ReviewIndex(root, splits, shard=shard, kinds=kinds)
    earlier: list[ReviewDecision] = []
    try:
        earlier = read_decisions(decisions_path(root))
    except FileNotFoundError:
        pass
    return ReviewServer((host, port), ReviewSession(index, log, earlier), verbose=verbose)
