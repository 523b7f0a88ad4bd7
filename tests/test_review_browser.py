"""``orsgen review`` in a real browser: headless Chromium driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` are the browser and its driver
(nothing is downloaded at test time). The test reviews three samples of the
demo's ``val`` split by keyboard, reads the decisions file, rebuilds the demo
with the decisions applied, and checks that an expression holding
``<script>`` shows as text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading

import pyarrow.parquet as pq
import pytest

from orsgen.pipelines.run import run_pipeline
from orsgen.schemas.config import load_config
from orsgen.stages.dataset.read import iter_rows, shards
from orsgen.stages.dataset.review import make_server
from orsgen.stages.screening import decisions_path, read_decisions
from review_fixtures import HOSTILE_EXPRESSION, HOSTILE_SAMPLE_ID, copy_dataset, make_hostile

INSTALL_HINT = (
    "the review browser test needs Debian's chromium and chromium-driver: "
    "apt-get install -y -q --no-install-recommends chromium chromium-driver (see the README's Quick start, command 2)"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(INSTALL_HINT, allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 20


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    # Selenium Manager must not look for (or download) a driver: we name ours.
    os.environ.setdefault("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


class Served:
    """A review server on a free port of 127.0.0.1, in a thread."""

    def __init__(self, root, **kw):
        self.server = make_server(str(root), reviewer="tester", port=0, **kw)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.server

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _open(driver, url):
    driver.get(url)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")


def _body(driver, attr):
    return driver.find_element(By.TAG_NAME, "body").get_attribute(attr)


def _press(driver, keys, saved_before):
    """Types ``keys`` into the page and waits until the next verdict is saved."""
    webdriver.ActionChains(driver).send_keys(keys).perform()
    WebDriverWait(driver, WAIT_S).until(lambda d: _body(d, "data-saved") == str(saved_before + 1))


def _text(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def _val_samples(root):
    return {s["sample_id"]: s for row in iter_rows(str(root), "val", columns=["key", "samples"]) for s in row["samples"]}


def test_review_by_keyboard_then_rebuild(browser, demo_output, tmp_path):
    root = copy_dataset(demo_output, tmp_path / "ds")
    original = _val_samples(root)
    with Served(root, splits=["val"]) as server:
        _open(browser, server.url)
        # It loads the demo output: the first val sample, its image and the progress.
        first = _body(browser, "data-sample-id")
        assert first in original
        assert _text(browser, "expression") == original[first]["expression"]
        assert _text(browser, "kind") == original[first]["kind"]
        assert "0 / 21 decided" in _text(browser, "progress")
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.execute_script("const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0;")
        )

        accepted = first
        _press(browser, "a", 0)
        rejected = _body(browser, "data-sample-id")
        assert rejected != accepted
        webdriver.ActionChains(browser).send_keys("r").perform()
        assert browser.find_element(By.ID, "reject-panel").is_displayed()
        _press(browser, "2", 1)  # the second preset reason: ambiguous
        skipped = _body(browser, "data-sample-id")
        _press(browser, "s", 2)
        typed = _body(browser, "data-sample-id")
        webdriver.ActionChains(browser).send_keys("r").perform()
        webdriver.ActionChains(browser).send_keys("t").perform()  # focus the free-text box
        _press(browser, "mask spills onto the table\n", 3)
        assert "4 / 21 decided" in _text(browser, "progress")
        assert len({accepted, rejected, skipped, typed}) == 4

        # Saved as they were made: the file is complete while the page is still open.
        got = {d.sample_id: (d.verdict, d.reason, d.reviewer, d.split) for d in read_decisions(decisions_path(str(root)))}
    assert got == {
        accepted: ("accept", "", "tester", "val"),
        rejected: ("reject", "ambiguous", "tester", "val"),
        skipped: ("skip", "", "tester", "val"),
        typed: ("reject", "mask spills onto the table", "tester", "val"),
    }
    assert pq.read_table(root / "_review" / "decisions.parquet").num_rows == 4

    # The rebuild applies them: rejects dropped, the accepted sample marked, the rest of val held out.
    cfg = load_config(
        demo_output.parent / "inputs" / "demo.yaml",
        [f"review.decisions={decisions_path(str(root))}", "review.require_screened_for=[val]"],
    )
    out = tmp_path / "rebuilt"
    manifest = run_pipeline(cfg, str(out), ["--runner=FnApiRunner"], show_progress=False)
    val = _val_samples(out)
    assert list(val) == [accepted] and val[accepted]["screened"] is True
    train = [s for row in iter_rows(str(out), "train", columns=["samples"]) for s in row["samples"]]
    assert len(train) == manifest["splits"]["train"]["samples"] and not any(s["screened"] for s in train)
    rejects = {}
    for ref in shards(str(out), "rejects"):
        for r in pq.read_table(ref.url).to_pylist():
            if r["stage"] == "screening":
                rejects[r["source_key"]] = r
    assert {k: r["reason"] for k, r in rejects.items() if r["reason"] == "human_rejected"} == {
        rejected: "human_rejected",
        typed: "human_rejected",
    }
    assert "ambiguous" in rejects[rejected]["message"] and "mask spills onto the table" in rejects[typed]["message"]
    assert rejects[skipped]["reason"] == "unscreened"
    assert sum(r["reason"] == "unscreened" for r in rejects.values()) == 21 - 3
    fig = manifest["counts"]["screening"]["splits"]["val"]
    assert (fig["samples"], fig["accepted"], fig["human_rejected"], fig["skipped"], fig["unscreened"], fig["written"]) == (21, 1, 2, 1, 18, 1)
    assert fig["rejected_by_reason"] == {"ambiguous": 1, "other": 1}
    assert manifest["counts"]["levels"]["samples"]["reconciled"] is True
    assert json.loads((out / "manifest.json").read_text())["counts"]["screening"]["decisions"]["matched"] == 4


def test_script_expression_renders_as_text(browser, demo_output, tmp_path):
    root = copy_dataset(demo_output, tmp_path / "hostile")
    make_hostile(root)
    with Served(root, splits=["val"]) as server:
        _open(browser, server.url)
        assert _body(browser, "data-sample-id") == HOSTILE_SAMPLE_ID
        assert _text(browser, "expression") == HOSTILE_EXPRESSION
        assert _text(browser, "sample-id") == HOSTILE_SAMPLE_ID
        # Nothing of the expression became markup, and no injected handler ran.
        assert browser.execute_script("return document.querySelectorAll('#panel script, #panel img').length") == 0
        _press(browser, "a", 0)
        assert browser.title == "orsgen review"
    [d] = read_decisions(decisions_path(str(root)))
    assert (d.sample_id, d.verdict) == (HOSTILE_SAMPLE_ID, "accept")
    assert not (tmp_path / "etc").exists()
