"""``orsgen review``'s server over HTTP: binding, refusals, escaping, the decisions store."""

from __future__ import annotations

import json
import os
import threading

import pyarrow.parquet as pq
import pytest

from orsgen.stages.dataset.review import ReviewError, ReviewStoreError, make_server, parse_shard
from orsgen.stages.screening import decisions_path, read_decisions
from review_fixtures import HOSTILE_EXPRESSION, HOSTILE_SAMPLE_ID, copy_dataset, make_hostile, request


@pytest.fixture
def hostile(demo_output, tmp_path):
    root = copy_dataset(demo_output, tmp_path / "ds")
    make_hostile(root)
    return root


@pytest.fixture
def served(hostile):
    server = make_server(str(hostile), splits=["val"], reviewer="alice", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _state(server):
    status, body = request(server, "GET", "/api/state")
    assert status == 200
    return json.loads(body)


def _samples(server):
    return json.loads(request(server, "GET", "/api/samples")[1])["samples"]


def test_binds_loopback_by_default(served):
    assert served.server_address[0] == "127.0.0.1"
    assert served.url.startswith("http://127.0.0.1:")


def test_serves_page_and_samples_with_security_headers(served):
    host, port = served.server_address[:2]
    status, body = request(served, "GET", "/")
    assert status == 200 and b'<script src="/app.js"' in body
    conn_headers = _headers(served, "/")
    assert "script-src 'self'" in conn_headers["content-security-policy"]
    assert conn_headers["x-content-type-options"] == "nosniff"
    samples = _samples(served)
    assert len(samples) == 21 and {s["split"] for s in samples} == {"val"}
    status, img = request(served, "GET", f"/api/image/{samples[1]['i']}")
    assert status == 200 and img[:2] == b"\xff\xd8"


def _headers(server, path):
    import http.client

    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return {k.lower(): v for k, v in resp.getheaders()}


def test_hostile_expression_and_id_stay_data(served, hostile):
    """A <script> expression comes back as JSON text; a ../ sample id is judged without becoming a path."""
    status, raw = request(served, "GET", "/api/samples")
    assert status == 200
    assert b"<script>" not in raw  # JSON escapes <, > and &: no markup on the wire
    hostile_row = next(s for s in json.loads(raw)["samples"] if s["sample_id"] == HOSTILE_SAMPLE_ID)
    assert hostile_row["expression"] == HOSTILE_EXPRESSION
    token = _state(served)["token"]
    status, body = request(
        served, "POST", "/api/decision",
        {"i": hostile_row["i"], "sample_id": HOSTILE_SAMPLE_ID, "verdict": "reject", "reason": "unsafe"},
        {"X-Orsgen-Token": token},
    )
    assert status == 200, body
    folder = hostile / "_review" / "decisions.parquet"
    parts = sorted(os.listdir(folder))
    assert len(parts) == 1 and parts[0].startswith("part-") and "etc" not in parts[0]
    assert not (hostile.parent / "etc").exists()
    [d] = read_decisions(decisions_path(str(hostile)))
    assert (d.sample_id, d.verdict, d.reason, d.reviewer) == (HOSTILE_SAMPLE_ID, "reject", "unsafe", "alice")


@pytest.mark.parametrize(
    "path",
    ["/../manifest.json", "/static/../../etc/passwd", "/api/image/..%2F..%2Fmanifest.json", "/%2e%2e/%2e%2e/etc/passwd", "/app.js/..%5c..%5cetc"],
)
def test_refuses_paths_outside_root(served, path):
    status, body = request(served, "GET", path)
    assert status == 403 and b"leaves the review root" in body


def test_unknown_routes_and_samples_are_404(served):
    assert request(served, "GET", "/manifest.json")[0] == 404
    assert request(served, "GET", "/api/image/999999")[0] == 404
    # http.server collapses a leading "//" to "/": a route, never a file.
    assert request(served, "GET", "//etc/passwd")[0] == 404


def test_refuses_foreign_host_header(served):
    status, body = request(served, "GET", "/api/state", headers={"Host": "evil.example:80"})
    assert status == 403 and b"Host" in body


def test_decision_needs_token_and_valid_body(served, hostile):
    samples = _samples(served)
    s = samples[2]
    ok = {"i": s["i"], "sample_id": s["sample_id"], "verdict": "accept"}
    assert request(served, "POST", "/api/decision", ok)[0] == 403  # no token: another web site cannot write
    token = {"X-Orsgen-Token": _state(served)["token"]}
    bad = [
        ({**ok, "verdict": "maybe"}, b"verdict must be"),
        ({**ok, "sample_id": samples[3]["sample_id"]}, b"does not match"),
        ({**ok, "i": 10**6}, b"unknown sample"),
        ({**ok, "verdict": "reject"}, b"needs a reason"),
        ({**ok, "verdict": "reject", "reason": "x" * 501}, b"at most 500"),
    ]
    for body, msg in bad:
        status, out = request(served, "POST", "/api/decision", body, token)
        assert status == 400 and msg in out, (body, out)
    assert request(served, "POST", "/api/decision", b"[1, 2]", token)[0] == 400
    assert not (hostile / "_review" / "decisions.parquet").exists()  # nothing invalid was stored
    assert request(served, "POST", "/api/decision", ok, token)[0] == 200
    assert _state(served)["progress"] == {"total": 21, "decided": 1, "accept": 1, "reject": 0, "skip": 0}


def test_sessions_write_disjoint_parts_and_resume(hostile):
    """Two reviewers on one folder never clobber each other; a new session sees both."""
    a = make_server(str(hostile), reviewer="alice", port=0, shard=(0, 2))
    b = make_server(str(hostile), reviewer="bob", port=0, shard=(1, 2))
    try:
        ids_a = {i.sample.sample_id for i in a.session.index.items}
        ids_b = {i.sample.sample_id for i in b.session.index.items}
        import pyarrow.parquet as pq

        every = {
            s["sample_id"]
            for f in sorted((hostile / "parquet" / "data").glob("*.parquet"))
            for row in pq.read_table(f, columns=["samples"]).to_pylist()
            for s in row["samples"]
        }
        assert ids_a and ids_b and not ids_a & ids_b and ids_a | ids_b == every  # every sample of the demo, once
        ia, ib = a.session.index.items[0], b.session.index.items[0]
        a.session.decide({"i": 0, "sample_id": ia.sample.sample_id, "verdict": "accept"})
        b.session.decide({"i": 0, "sample_id": ib.sample.sample_id, "verdict": "reject", "reason": "a free-text\nreason"})
        a.session.decide({"i": 1, "sample_id": a.session.index.items[1].sample.sample_id, "verdict": "skip"})
    finally:
        a.server_close()
        b.server_close()
    folder = hostile / "_review" / "decisions.parquet"
    assert len([p for p in os.listdir(folder) if p.startswith("part-")]) == 2
    assert not [p for p in os.listdir(folder) if p.startswith(".")]  # no temp file left behind
    table = pq.read_table(folder)  # Arrow reads the folder as one dataset
    assert sorted(table.column("verdict").to_pylist()) == ["accept", "reject", "skip"]
    got = {d.sample_id: (d.verdict, d.reason, d.reviewer) for d in read_decisions(decisions_path(str(hostile)))}
    assert got[ib.sample.sample_id] == ("reject", "a free-text reason", "bob")
    c = make_server(str(hostile), reviewer="carol", port=0)
    try:
        assert c.session.progress()["decided"] == 3
    finally:
        c.server_close()


def test_bad_arguments_are_clear_errors(hostile):
    with pytest.raises(ReviewError, match="not in"):
        make_server(str(hostile), splits=["nope"], reviewer="alice", port=0)
    with pytest.raises(ReviewStoreError, match="reviewer name"):
        make_server(str(hostile), reviewer="../x", port=0)
    with pytest.raises(ReviewError, match="K/N"):
        parse_shard("2/2")
    assert parse_shard("1/3") == (1, 3)


def test_ci_installs_the_browser_as_the_readme_says():
    """.ci/run runs the README's Quick start command 2 verbatim, apt line for Chromium included."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    block = readme.split("# 2. run the tests", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    readme_cmds = [line for line in block.splitlines() if line and not line.lstrip().startswith("#")]
    ci_cmds = [line for line in (repo / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert readme_cmds == ci_cmds
    assert any("apt-get install" in c and "chromium chromium-driver" in c for c in ci_cmds)
