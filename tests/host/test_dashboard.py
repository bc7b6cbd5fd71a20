"""The collector's dashboard over real HTTP: token rule, matrix, views, history band, live revision."""
from __future__ import annotations

import http.client
import json
import re
import urllib.parse

import pytest
from results_factory import P50, demo_reports

from edgepipe.device.http import ClientError, request
from edgepipe.pipeline import reporting as rp
from edgepipe.pipeline.collector import CollectorServer
from edgepipe.pipeline.dashboard import COOKIE, Dashboard, session_value
from edgepipe.pipeline.store import open_store

TOKEN = "dash-token"


def start(tmp_path, token=TOKEN, **kw):
    store = open_store(str(tmp_path / "results.db"))
    store.add_many(demo_reports())
    srv = CollectorServer(store, "127.0.0.1", 0, token=token, dashboard=Dashboard(store, **kw))
    srv.start_background()
    return srv


@pytest.fixture
def collector(tmp_path):
    srv = start(tmp_path)
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.store.close()


def get(srv, path, headers=None, method="GET", body=None):
    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read().decode("utf-8")
    c.close()
    return r.status, dict(r.getheaders()), data


def login(srv, token=TOKEN):
    return get(srv, "/login", {"Content-Type": "application/x-www-form-urlencoded"}, "POST",
               urllib.parse.urlencode({"token": token}))


def cookie(srv):
    return {"Cookie": f"{COOKIE}={session_value(TOKEN)}"}


def test_token_rule(collector):
    status, headers, page = get(collector, "/")
    assert status == 200 and "Sign in" in page and "166" not in page  # no data without the token
    assert get(collector, "/dashboard/rev")[0] == 401
    assert login(collector, "wrong")[0] == 403
    status, headers, _ = login(collector)
    assert status == 303 and headers["Location"] == "/"
    assert headers["Set-Cookie"].startswith(f"{COOKIE}={session_value(TOKEN)};") and "HttpOnly" in headers["Set-Cookie"]
    status, _, page = get(collector, "/", cookie(collector))
    assert status == 200 and 'class="matrix"' in page
    # A bearer header opens it too; the cookie never opens the report API (no cross-site writes).
    assert get(collector, "/", {"Authorization": f"Bearer {TOKEN}"})[2].count('class="matrix"') == 1
    with pytest.raises(ClientError) as e:
        request("GET", collector.url + "/v1/reports", token=None)
    assert e.value.status == 401
    status, _, _ = get(collector, "/v1/reports", cookie(collector))
    assert status == 401


def test_matrix_shows_latest_p50_with_accuracy_and_both_latency_charts(collector):
    _, _, page = get(collector, "/", cookie(collector))
    cells = {float(v) for v in re.findall(r'data-p50="([0-9.]+)"', page)}
    assert cells == {p for p in P50.values()} | {round(p * 2.6, 3) for p in P50.values()}  # latest, not older
    assert "pi5-bench" in page and "raspberrypi" in page  # named device and a legacy hostname-only one
    assert "0.960" in page  # int8's agreement from its evaluation, next to latency
    assert "Invoke latency" in page and "End-to-end frame latency" in page and "(log scale)" in page
    assert "video:vtest_short.avi" in page and "images:images" in page  # two sources, two rows
    assert "Per-stage breakdown" in page and "postprocess" in page
    assert "Pareto" in page and page.count("<svg") >= 5
    assert '<div class="scroll"><table' in page


def test_device_model_and_history_views_with_baseline_band(tmp_path):
    base_rows = rp.latest(rp.row(r) for r in demo_reports())
    srv = start(tmp_path, token=None, baseline=base_rows, tolerance=0.1)
    try:
        _, _, page = get(srv, "/?device=pi5-0a1b2c3d4e5f")
        assert "Device pi5-0a1b2c3d4e5f" in page and "raspberrypi" not in page.split("</nav>")[1]
        _, _, page = get(srv, "/?model=mobilenet_v2")
        assert "Model mobilenet_v2" in page
        rid = re.search(r'href="/\?history=([0-9a-f-]+)"', page).group(1)
        _, _, hist = get(srv, f"/?history={rid}")
        assert "History:" in hist and "Baseline p50" in hist and hist.count("<tr>") >= 2
        assert get(srv, "/?history=nope")[0] == 404
    finally:
        srv.shutdown()
        srv.server_close()
        srv.store.close()


def test_revision_changes_when_a_report_arrives(collector):
    _, _, before = get(collector, "/dashboard/rev", cookie(collector))
    new = demo_reports()[0]
    new["device"] = {"hostname": "pi-zero", "id": "zero-12345678", "name": "pi-zero"}
    request("POST", collector.url + "/v1/reports", body=new, token=TOKEN)
    _, _, after = get(collector, "/dashboard/rev", cookie(collector))
    assert json.loads(after)["count"] == json.loads(before)["count"] + 1
    _, _, content = get(collector, "/dashboard/content", cookie(collector))
    assert "pi-zero" in content and "<html" not in content
