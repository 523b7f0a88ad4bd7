"""Helpers of the review tests: a copy of the demo output, optionally made hostile."""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orsgen.schemas.arrow import EXAMPLE_SCHEMA
from orsgen.stages.dataset.read import shards

#: An expression that runs script if any page renders it as markup.
HOSTILE_EXPRESSION = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned2'\"> the cat"
#: A sample id that would leave the folder if it ever became a path.
HOSTILE_SAMPLE_ID = "../../../etc/passwd"


def copy_dataset(src: Path, dest: Path) -> Path:
    """A private copy of a (session-shared, read-only) output folder."""
    shutil.copytree(src, dest)
    return dest


def make_hostile(root: Path, split: str = "val") -> str:
    """Rewrites the first sample of ``split``: a ``<script>`` expression and a ``../`` sample id.

    Returns:
        The original sample id of the rewritten sample.
    """
    ref = shards(str(root), "parquet", split)[0]
    table = pq.read_table(ref.url)
    rows = table.to_pylist()
    for row in rows:
        if row["samples"]:
            s = row["samples"][0]
            old = s["sample_id"]
            s["sample_id"] = HOSTILE_SAMPLE_ID
            s["expression"] = HOSTILE_EXPRESSION
            break
    else:  # pragma: no cover - the demo's splits all hold samples
        raise AssertionError(f"split {split} has no samples")
    pq.write_table(pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA), ref.url)
    return old


def request(server: Any, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One raw HTTP request to a running review server (paths are sent as given)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out
