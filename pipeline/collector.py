"""The collector: devices POST reports here, they land in the results DB.

Routes (DESIGN.md): ``POST /v1/reports`` (201 new, 200 same id and body, 409
same id with another body), ``GET /v1/reports`` with filters,
``GET /v1/reports/{id}``, ``GET /healthz``, and the dashboard at ``/``
(pipeline/dashboard.py). Anything bad gets a 4xx with a
one-line reason and stores nothing: malformed, too deeply nested or non-finite
JSON 400, off-contract or unstorable 422. One bad report never fails another.
"""
from __future__ import annotations

import urllib.parse
from typing import Callable, Optional

from edgepipe.device.contracts import report_problem
from edgepipe.device.http import HTTPError_, JSONHandler, Limits, Server, check_bind
from edgepipe.pipeline.dashboard import Dashboard, DashboardHandlerMixin
from edgepipe.pipeline.store import FILTERS, ReportConflict, Store, StoreError, Unstorable

DEFAULT_PORT = 8750
DEFAULT_MAX_BODY = 1 << 20  # a report is a few KB; 1 MiB leaves room for accuracy blocks
MAX_LIMIT = 10000


class CollectorHandler(DashboardHandlerMixin, JSONHandler):
    def route(self, method, path, query):
        srv: CollectorServer = self.server  # type: ignore[assignment]
        page = self.dashboard_route(method, path, query)
        if page is not None:
            return page
        if path == "/healthz" and method in ("GET", "HEAD"):
            return 200, {"ok": True, "service": "edgepipe-collector"}
        if path == "/v1/reports":
            if method == "POST":
                return self._post(srv)
            if method == "GET":
                return 200, self._list(srv, query)
            raise HTTPError_(405, f"{method} not allowed on {path}")
        if path.startswith("/v1/reports/") and method == "GET":
            rep = srv.store.get(path.rsplit("/", 1)[1])
            if rep is None:
                raise HTTPError_(404, "no such report")
            return 200, rep
        raise HTTPError_(404, f"no route for {method} {path}")

    def _post(self, srv):
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if ctype not in ("application/json", ""):
            raise HTTPError_(415, f"expected application/json, got {ctype}")
        doc = self.read_json()
        if not isinstance(doc, dict):
            raise HTTPError_(400, "report must be a JSON object")
        reason = srv.validate(doc)
        if reason:
            raise HTTPError_(422, f"report does not match edgepipe.report/1: {reason}")
        try:
            new = srv.store.add(doc)
        except ReportConflict as e:
            raise HTTPError_(409, f"{e}; a new measurement needs a new id") from None
        except Unstorable as e:
            raise HTTPError_(422, f"report cannot be stored: {e}") from None
        except StoreError as e:  # the database itself failed: the sender should retry later
            raise HTTPError_(503, str(e)) from None
        if srv.on_report is not None:
            srv.on_report(doc, new)
        return (201 if new else 200), {"id": doc["id"], "stored": new, "duplicate": not new}

    def _list(self, srv, query):
        params = urllib.parse.parse_qs(query, keep_blank_values=False)
        filters, since, limit = {}, None, 1000
        for key, values in params.items():
            value = values[-1]
            if key == "since":
                since = value
            elif key == "limit":
                try:
                    limit = int(value)
                except ValueError:
                    raise HTTPError_(400, "limit must be an integer") from None
                if not 0 < limit <= MAX_LIMIT:
                    raise HTTPError_(400, f"limit must be between 1 and {MAX_LIMIT}")
            elif key in FILTERS:
                if key == "threads" and not (value.lstrip("-").isdigit() and len(value) <= 20):
                    raise HTTPError_(400, "threads must be an integer")
                filters[key] = value
            else:
                raise HTTPError_(400, f"unknown filter {key!r} (known: since, limit, "
                                      f"{', '.join(sorted(FILTERS))})")
        reports = srv.store.query(since=since, limit=limit, **filters)
        return {"count": len(reports), "reports": reports}


class CollectorServer(Server):
    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 token: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY,
                 on_report: Optional[Callable[[dict, bool], None]] = None, limits: Optional[Limits] = None,
                 dashboard: Optional[Dashboard] = None):
        check_bind(host, token)
        self.store = store
        self.dashboard = dashboard or Dashboard(store)
        self.validate = report_problem  # None or a one-line "path: problem"
        self.on_report = on_report
        super().__init__((host, port), CollectorHandler, token=token, max_body=max_body, limits=limits)
