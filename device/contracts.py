"""The JSON-Schema contracts (report, bundle manifest) and the one validator for them.

The schemas in ``device/schemas/`` are the contracts between the device, the
host and the collector. Every side validates through this module, which
compiles each schema once (lazily) with ``fastjsonschema``: pure Python, so it
runs on a Pi, and the compiled checker costs microseconds per report, which is
what the collector's ingest rate needs.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Optional

from edgepipe.device.errors import EdgepipeError

# Contract name -> schema file in edgepipe.device/schemas.
SCHEMA_FILES = {"report": "report.schema.json", "manifest": "bundle.schema.json"}
# Longest error line (the JSON path may hold untrusted keys).
MAX_MESSAGE = 240


class ContractError(EdgepipeError, ValueError):
    """A document that breaks its contract; ``str`` is one bounded line naming the path and problem."""

    def __init__(self, contract: str, where: str, problem: str):
        # The path may hold untrusted keys: shorten it first so the problem stays readable.
        where = _fold(where, MAX_MESSAGE // 2)
        self.contract, self.where, self.problem = contract, where, problem
        super().__init__(_fold(f"invalid {contract}: {where}: {problem}"))

    @property
    def detail(self) -> str:
        """``where: problem`` without the contract name (for callers that add their own prefix)."""
        return _fold(f"{self.where}: {self.problem}")


def _fold(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@lru_cache(maxsize=None)
def schema(contract: str) -> dict:
    """The parsed JSON Schema of ``contract`` (``"report"`` or ``"manifest"``), read from the package."""
    try:
        name = SCHEMA_FILES[contract]
    except KeyError:
        raise ValueError(f"unknown contract {contract!r} (known: {', '.join(SCHEMA_FILES)})") from None
    text = resources.files("edgepipe.device").joinpath("schemas", name).read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=None)
def _compiled(contract: str) -> Callable[[Any], Any]:
    import fastjsonschema

    # "$id" is a name, not a URL: as a base URI it would send "#/$defs/..." refs
    # to a remote fetch. Our refs are all local, and no scheme may go remote.
    doc = {k: v for k, v in schema(contract).items() if k != "$id"}
    handlers = {s: _no_remote for s in ("http", "https", "file", "ftp", "")}
    # Formats are not part of our contracts; skipping them keeps the checker lean.
    return fastjsonschema.compile(doc, handlers=handlers, use_formats=False)


def _no_remote(uri: str) -> dict:
    raise ValueError(f"contract schemas must not reference {uri!r}")


def _where(name: str) -> str:
    # fastjsonschema names the failing node "data", "data.device.hostname", "data.warnings[1]".
    if name == "data":
        return "(root)"
    return name[5:] if name.startswith("data.") else name[4:] if name.startswith("data[") else name


def validate(contract: str, doc: Any) -> Any:
    """Return ``doc`` if it satisfies ``contract``, else raise :class:`ContractError` (first problem found)."""
    from fastjsonschema import JsonSchemaValueException

    try:
        _compiled(contract)(doc)
    except JsonSchemaValueException as e:
        name = e.name or "data"
        message = e.message[len(name):].strip() if e.message.startswith(name) else e.message
        raise ContractError(contract, _where(name), message) from None
    except RecursionError:
        raise ContractError(contract, "(root)", "nested too deeply") from None
    return doc


def problem(contract: str, doc: Any) -> Optional[str]:
    """None when ``doc`` satisfies ``contract``, else the one-line ``path: problem`` reason."""
    try:
        validate(contract, doc)
    except ContractError as e:
        return e.detail
    return None


def validate_report(doc: Any) -> dict:
    """Return ``doc`` if it is a valid ``edgepipe.report/1`` document, else raise :class:`ContractError`."""
    return validate("report", doc)


def validate_manifest(doc: Any) -> dict:
    """Return ``doc`` if it is a valid ``edgepipe.bundle/1`` manifest, else raise :class:`ContractError`."""
    return validate("manifest", doc)


def report_problem(doc: Any) -> Optional[str]:
    """None for a valid report, else a one-line reason (what the collector answers with 422)."""
    return problem("report", doc)
