"""The collector's dashboard at ``/``: results people can see, live.

Server-rendered HTML from the templates in ``pipeline/templates`` (shared with
the static ``edgepipe report --html``), inline SVG charts, and a little JS that
polls ``/dashboard/rev`` and swaps in ``/dashboard/content`` when a report
arrives. Auth follows the API's token: with a token set, the page asks for it
(a form, or ``#token=...`` in the address, which never reaches server logs)
and keeps a session cookie derived from it; the cookie only opens read-only
dashboard pages, never the report API.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import string
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Optional

from edgepipe.device.http import HTTPError_
from edgepipe.pipeline import reporting as rp
from edgepipe.pipeline import views

COOKIE = "edgepipe_session"
PATHS = ("/", "/login", "/dashboard/rev", "/dashboard/content")
MAX_REPORTS = 5000  # newest reports the dashboard considers (latest per configuration among them)
MAX_LOGIN_BODY = 4096


@lru_cache(maxsize=None)
def template(name: str) -> str:
    """A template file from the package (pipeline/templates)."""
    return resources.files("edgepipe.pipeline").joinpath("templates", name).read_text("utf-8")


def render_page(content: str, *, title: str = "edgepipe results", status: str = "", nav: str = "",
                live: bool = False, poll_ms: int = 2000, script: Optional[bool] = None) -> str:
    """A whole HTML page around ``content``; ``live`` polls for new reports; ``script`` (default: live)
    includes the page script, which the sign-in page needs for ``#token=`` addresses."""
    script = f"<script>\n{template('dashboard.js')}\n</script>" if (live if script is None else script) else ""
    return string.Template(template("page.html")).substitute(
        title=views.esc(title), css=template("dashboard.css"), status=views.esc(status), nav=nav,
        content=content, script=script, live="1" if live else "0", poll=str(int(poll_ms)))


@dataclass(frozen=True)
class Page:
    """A non-JSON answer from a route: body, content type, extra headers."""

    status: int
    body: bytes
    ctype: str = "text/html; charset=utf-8"
    headers: tuple = ()


def session_value(token: str) -> str:
    """The cookie a browser keeps after signing in: derived from the token, useless for the API."""
    return hmac.new(token.encode("utf-8"), b"edgepipe-dashboard-session", hashlib.sha256).hexdigest()


class Dashboard:
    """What the dashboard shows: the store, plus an optional baseline for history bands."""

    def __init__(self, store, *, baseline: Optional[list] = None, tolerance: float = 0.10, poll_ms: int = 2000,
                 title: str = "edgepipe results"):
        self.store = store
        self.baseline = {rp.key_of(b): b for b in (baseline or [])}
        self.tolerance = tolerance
        self.poll_ms = poll_ms
        self.title = title

    # -- data ----------------------------------------------------------------
    def rows(self) -> list:
        reports = self.store.query(limit=MAX_REPORTS)
        return rp.attach_accuracy(rp.latest(rp.row(r) for r in reports))

    def band(self, key: tuple) -> Optional[tuple]:
        b = self.baseline.get(key)
        if not b or b.get("p50") is None:
            return None
        p = b["p50"]
        return (p / (1 + self.tolerance), p, p * (1 + self.tolerance))

    def content(self, query: dict) -> str:
        """The main part of the page for ``query`` (device=, model=, history=), with its navigation
        (inside, so devices that appear while the page is open get their links too)."""
        rows = self.rows()
        return views.nav(rows) + self._view(query, rows)

    def _view(self, query: dict, rows: list) -> str:
        if query.get("history"):
            rep = self.store.get(query["history"])
            if rep is None:
                raise HTTPError_(404, "no such report")
            base = rp.row(rep)
            key = rp.key_of(base)
            cand = self.store.query(kind=base["kind"], model=base["model"], limit=MAX_REPORTS)
            rows = [r for r in (rp.row(c) for c in cand) if rp.key_of(r) == key]
            return views.history(rows, self.band(key))
        if query.get("device"):
            rows = [r for r in rows if query["device"] in (r["device_key"], r["device"], r.get("hostname"))]
            return f"<h2>Device {views.esc(query['device'])}</h2>" + views.overview(rows, link)
        if query.get("model"):
            rows = [r for r in rows if r["family"] == query["model"] or r["model"] == query["model"]]
            return f"<h2>Model {views.esc(query['model'])}</h2>" + views.overview(rows, link)
        if not rows:
            return ('<p class="muted">No results yet. Send some: <code>edgerun bench BUNDLE --report-to '
                    "http://THIS-HOST:PORT</code> on a device, or <code>edgepipe bench</code> here.</p>")
        return views.overview(rows, link)

    def status(self) -> str:
        n, _ = revision(self.store)
        when = _dt.datetime.now().strftime("%H:%M:%S")
        return f"{n} reports stored; page rendered {when}"


def link(r: dict) -> Optional[str]:
    return "/?" + urllib.parse.urlencode({"history": r["id"]}) if r.get("id") else None


def revision(store) -> tuple:
    """(count, newest-received) of a store: changes whenever a report is stored by anyone."""
    fn = getattr(store, "revision", None)
    if fn is not None:
        return fn()
    return store.count(), 0.0


# -- HTTP --------------------------------------------------------------------

def _query(qs: str) -> dict:
    return {k: v[-1] for k, v in urllib.parse.parse_qs(qs).items() if k in ("device", "model", "history")}


def _html(status: int, text: str, headers: tuple = ()) -> Page:
    return Page(status, text.encode("utf-8"), headers=(("Cache-Control", "no-store"),) + headers)


def authorized(handler) -> bool:
    """No token set, a valid bearer header, or the session cookie."""
    token = handler.server.token
    if not token:
        return True
    auth = handler.headers.get("Authorization", "")
    if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        return True
    for part in handler.headers.get("Cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and hmac.compare_digest(value.encode(), session_value(token).encode()):
            return True
    return False


def _login(handler, dash: Dashboard) -> Page:
    token = handler.server.token
    raw = handler.read_body(MAX_LOGIN_BODY)
    ctype = handler.headers.get("Content-Type", "").split(";")[0].strip()
    try:
        if ctype == "application/json":
            given = str((json.loads(raw.decode("utf-8")) or {}).get("token", ""))
        else:
            given = urllib.parse.parse_qs(raw.decode("utf-8")).get("token", [""])[-1]
    except (ValueError, AttributeError):
        given = ""
    if not token:
        return _html(303, "", (("Location", "/"),))
    if not hmac.compare_digest(given.encode(), token.encode()):
        page = string.Template(template("login.html")).substitute(error="wrong token")
        return _html(403, render_page(page, title=dash.title, status="sign in"))
    cookie = f"{COOKIE}={session_value(token)}; Path=/; HttpOnly; SameSite=Strict"
    return _html(303, "", (("Location", "/"), ("Set-Cookie", cookie)))


def route(handler, dash: Dashboard, method: str, path: str, query: str):
    """Answer a dashboard path; ``(status, payload)`` like any route (payload a Page or JSON)."""
    if path == "/login":
        if method != "POST":
            raise HTTPError_(405, "POST the token to /login")
        return 200, _login(handler, dash)
    if method not in ("GET", "HEAD"):
        raise HTTPError_(405, f"{method} not allowed on {path}")
    ok = authorized(handler)
    if path == "/":
        if not ok:
            page = string.Template(template("login.html")).substitute(error="")
            return 200, _html(200, render_page(page, title=dash.title, status="sign in", script=True))
        return 200, _html(200, render_page(dash.content(_query(query)), title=dash.title, status=dash.status(),
                                           live=True, poll_ms=dash.poll_ms))
    if not ok:
        raise HTTPError_(401, "sign in first (token)")
    if path == "/dashboard/rev":
        n, newest = revision(dash.store)
        return 200, {"rev": f"{n}:{newest:.6f}", "count": n}
    return 200, _html(200, dash.content(_query(query)))


class DashboardHandlerMixin:
    """Mix into the collector's handler: serves PATHS and sends :class:`Page` answers."""

    public_paths = ("/healthz",) + PATHS  # the dashboard checks the token (or cookie) itself

    def dashboard_route(self, method: str, path: str, query: str):
        if path not in PATHS:
            return None
        srv = self.server
        dash = getattr(srv, "dashboard", None)
        if dash is None:
            dash = srv.dashboard = Dashboard(srv.store)
        return route(self, dash, method, path, query)

    def send_json(self, status, payload):
        if not isinstance(payload, Page):
            return super().send_json(status, payload)
        self.send_response(payload.status)
        self.send_header("Content-Type", payload.ctype)
        self.send_header("Content-Length", str(len(payload.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                    "style-src 'unsafe-inline'; img-src 'self' data:")
        for k, v in payload.headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload.body)
