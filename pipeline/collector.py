"""The collector: devices POST reports here, they land in the results DB.

Routes (DESIGN.md): ``POST /v1/reports`` (201 new, 200 duplicate id),
``GET /v1/reports`` with filters, ``GET /v1/reports/{id}``, ``GET /healthz``.
Anything bad gets a 4xx with a one-line reason and stores nothing.
"""
from __future__ import annotations

import json
import re
import urllib.parse
from importlib import resources
from typing import Callable, Optional

from edgepipe.device.http import HTTPError_, JSONHandler, Server, check_bind
from edgepipe.pipeline.store import FILTERS, Store

DEFAULT_PORT = 8750
DEFAULT_MAX_BODY = 1 << 20  # a report is a few KB; 1 MiB leaves room for accuracy blocks
MAX_LIMIT = 10000


def report_schema() -> dict:
    return json.loads(resources.files("device").joinpath("schemas/report.schema.json").read_text("utf-8"))


# Keywords the compiled fast path implements. When the schema uses only
# these, a report the fast path accepts is valid; anything it refuses goes to
# jsonschema, which has the final word and explains the refusal. Ingest speed
# is what this buys: jsonschema alone costs ~0.7 ms a report.
_FAST_KEYWORDS = {"$schema", "$id", "title", "description", "type", "required", "properties", "const",
                  "enum", "pattern", "minLength", "minimum", "additionalProperties", "items", "$ref",
                  "$defs"}

_PY_TYPES = {"object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
             "number": (int, float), "boolean": (bool,), "null": (type(None),)}


def _keywords(node, out: set) -> set:
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(k)
            if k in ("properties", "$defs"):
                for sub in v.values():
                    _keywords(sub, out)
            elif isinstance(v, (dict, list)) and k not in ("enum", "const", "required", "type"):
                _keywords(v, out)
    elif isinstance(node, list):
        for v in node:
            _keywords(v, out)
    return out


def compile_schema(schema: dict, root: Optional[dict] = None) -> Callable[[object], bool]:
    """A predicate that is True only for instances valid under ``schema``.

    Possibly stricter than JSON Schema (1.0 is not an integer here), never
    looser, for the keywords in _FAST_KEYWORDS.
    """
    root = schema if root is None else root
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref}")
        return compile_schema(root["$defs"][ref.rsplit("/", 1)[1]], root)
    types = None
    if "type" in schema:
        t = schema["type"]
        types = frozenset(x for name in ([t] if isinstance(t, str) else t) for x in _PY_TYPES[name])
    checks = []
    if "const" in schema:
        c = schema["const"]
        checks.append(lambda v: type(v) is type(c) and v == c)
    if "enum" in schema:
        opts = tuple(schema["enum"])
        checks.append(lambda v: any(type(v) is type(o) and v == o for o in opts))
    if "pattern" in schema:
        rx = re.compile(schema["pattern"])
        checks.append(lambda v: type(v) is not str or rx.search(v) is not None)
    if "minLength" in schema:
        n = schema["minLength"]
        checks.append(lambda v: type(v) is not str or len(v) >= n)
    if "minimum" in schema:
        lo = schema["minimum"]
        checks.append(lambda v: type(v) not in (int, float) or v >= lo)
    required = tuple(schema.get("required", ()))
    props = {k: compile_schema(v, root) for k, v in schema.get("properties", {}).items()}
    extra = schema.get("additionalProperties", True)
    extra_check = compile_schema(extra, root) if isinstance(extra, dict) else None
    if required or props or extra is not True:
        def obj(v):
            if type(v) is not dict:
                return True
            for k in required:
                if k not in v:
                    return False
            for k, x in v.items():
                sub = props.get(k)
                if sub is not None:
                    if not sub(x):
                        return False
                elif extra is False or (extra_check is not None and not extra_check(x)):
                    return False
            return True
        checks.append(obj)
    if isinstance(schema.get("items"), dict):
        item = compile_schema(schema["items"], root)

        def items(v):
            if type(v) is not list:
                return True
            for x in v:
                if not item(x):
                    return False
            return True
        checks.append(items)
    checks = tuple(checks)

    def check(v):
        if types is not None and type(v) not in types:
            return False
        for c in checks:
            if not c(v):
                return False
        return True
    return check


def make_validator() -> Callable[[object], Optional[str]]:
    """A function returning None for a valid report or a one-line reason."""
    schema = report_schema()
    fast = compile_schema(schema) if _keywords(schema, set()) <= _FAST_KEYWORDS else None
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the host extra installs jsonschema
        from edgepipe.device.report import report_problems

        def light(doc):
            problems = report_problems(doc)
            return "; ".join(problems[:3])[:300] if problems else None
        return light

    validator = jsonschema.Draft202012Validator(schema)

    def check(doc):
        if fast is not None and fast(doc):
            return None
        err = jsonschema.exceptions.best_match(validator.iter_errors(doc))
        if err is None:
            return None
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return f"{where}: {err.message}"[:300]
    return check


class CollectorHandler(JSONHandler):
    def route(self, method, path, query):
        srv: CollectorServer = self.server  # type: ignore[assignment]
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
        new = srv.store.add(doc)
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
                if key == "threads" and not value.lstrip("-").isdigit():
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
                 on_report: Optional[Callable[[dict, bool], None]] = None):
        check_bind(host, token)
        self.store = store
        self.validate = make_validator()
        self.on_report = on_report
        super().__init__((host, port), CollectorHandler, token=token, max_body=max_body)
