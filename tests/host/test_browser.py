"""The dashboard and the static report in a real headless Chromium (selenium + Debian's chromedriver).

Checks what a person sees: the matrix shows the stored p50s, a report posted
while the page is open appears without a reload, and screenshots land in
out/screenshots/ for people to look at.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from results_factory import DEVICES, P50, bench, demo_reports

from edgepipe.device.http import request
from edgepipe.pipeline import reporting as rp
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.collector import CollectorServer
from edgepipe.pipeline.dashboard import Dashboard
from edgepipe.pipeline.store import open_store

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("EDGEPIPE_SCREENSHOTS", REPO / "out" / "screenshots"))
TOKEN = "browser-token"
CHROME = os.environ.get("CHROME_BIN", "/usr/bin/chromium")
DRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    for path, pkg in ((CHROME, "chromium"), (DRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} missing (Debian package {pkg}; scripts/setup-services.sh installs it)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="edgepipe-chrome-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROME
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1360,1000"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(fn, secs=30.0, what="condition"):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        got = fn()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def screenshot(drv, name: str) -> Path:
    """A full-page screenshot: the window grows to the page's height first."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = drv.execute_script("return document.documentElement.scrollHeight")
    drv.set_window_size(1360, min(max(900, int(height) + 40), 6000))
    path = SHOTS / name
    assert drv.save_screenshot(str(path)), f"could not save {path}"
    drv.set_window_size(1360, 1000)
    return path


def matrix_p50s(drv) -> set:
    """(stored p50, shown text) of every matrix cell, read in one go (live updates swap the DOM)."""
    cells = drv.execute_script("return Array.from(document.querySelectorAll('table.matrix td[data-p50]'))"
                               ".filter(td => td.offsetParent !== null)"
                               ".map(td => [td.dataset.p50, td.textContent.trim()])")
    return {tuple(c) for c in cells}


@pytest.fixture
def collector(tmp_path):
    db = tmp_path / "results.db"
    store = open_store(str(db))
    store.add_many(demo_reports())
    baseline = rp.latest(rp.row(r) for r in demo_reports() if r["kind"] == "bench")  # a saved report set
    srv = CollectorServer(store, "127.0.0.1", 0, token=TOKEN,
                          dashboard=Dashboard(store, baseline=baseline, tolerance=0.1, poll_ms=500))
    srv.start_background()
    yield srv, db
    srv.shutdown()
    srv.server_close()
    store.close()


def test_dashboard_shows_stored_results_and_live_reports(browser, collector):
    srv, _ = collector
    browser.get(f"{srv.url}/#token={TOKEN}")  # the token never reaches the server's logs or history
    wait_for(lambda: browser.find_elements("css selector", "table.matrix"), what="the matrix after sign-in")
    assert "#token" not in browser.current_url
    seen = matrix_p50s(browser)
    assert ("1.7", "1.70") in seen and ("166.0", "166.00") in seen and ("431.6", "431.60") in seen, seen
    assert len(seen) == 2 * len(P50)
    assert wait_for(lambda: "live:" in browser.find_element("id", "status").text, what="the live status")
    screenshot(browser, "dashboard.png")

    browser.execute_script("window.__sameDocument = 42")  # survives only if the page is not reloaded
    newcomer = dict(DEVICES[0], id="zero-9f8e7d6c", name="pi-zero-2w", hostname="pizero")
    request("POST", srv.url + "/v1/reports", body=bench(newcomer, "int8", 23.456), token=TOKEN)
    wait_for(lambda: any(p == "23.456" for p, _ in matrix_p50s(browser)), what="the posted report in the matrix")
    assert browser.execute_script("return window.__sameDocument") == 42
    assert "pi-zero-2w" in browser.execute_script("return document.querySelector('table.matrix').textContent")
    time.sleep(1.6)  # let the "new content" highlight fade before the screenshot
    screenshot(browser, "dashboard-live.png")

    browser.get(f"{srv.url}/?model=mobilenet_v2")
    link = browser.find_element("css selector", "table.matrix td[data-p50] a")
    link.click()
    wait_for(lambda: "History:" in browser.page_source, what="the history view")
    assert "Baseline p50" in browser.page_source and len(browser.find_elements("css selector", "#history circle")) == 4
    screenshot(browser, "dashboard-history.png")


def test_static_report_shows_the_same_matrix(browser, collector, tmp_path):
    _, db = collector
    html = SHOTS / "report.html"
    res = CliRunner().invoke(edgepipe, ["report", "--db", str(db), "--html", str(html)])
    assert res.exit_code == 0, res.output
    browser.get(html.resolve().as_uri())
    seen = matrix_p50s(browser)
    assert ("1.7", "1.70") in seen and ("166.0", "166.00") in seen, seen
    assert browser.find_elements("css selector", "#latency svg") and "End-to-end frame latency" in browser.page_source
    # Tables scroll inside their own box: the page itself is never wider than the window.
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    screenshot(browser, "report.png")
