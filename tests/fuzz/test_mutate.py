"""The mutant generator itself: deterministic, one field per mutant, every kind covered, valid flatbuffers."""
from __future__ import annotations

import json

from fuzz.mutate import FIELDS, default_models, make_mutants, read_model


def test_same_seed_same_files_and_every_field_kind(tmp_path):
    models = default_models()
    a = make_mutants(models, tmp_path / "a", count=2 * len(FIELDS), seed=7)
    b = make_mutants(models, tmp_path / "b", count=2 * len(FIELDS), seed=7)
    assert [m.path.read_bytes() for m in a] == [m.path.read_bytes() for m in b]
    assert [m.description for m in a] == [m.description for m in b]
    assert {m.field for m in a} == set(FIELDS)
    other = make_mutants(models, tmp_path / "c", count=2 * len(FIELDS), seed=8)
    assert [m.path.read_bytes() for m in other] != [m.path.read_bytes() for m in a]
    index = json.loads((tmp_path / "a" / "mutants.json").read_text())
    assert [e["path"] for e in index["mutants"]] == [m.path.name for m in a]


def test_mutants_differ_from_their_source_and_still_parse(tmp_path):
    models = {p.name: p.read_bytes() for p in default_models()}
    for m in make_mutants(default_models(), tmp_path, count=len(FIELDS), seed=1):
        data = m.path.read_bytes()
        assert data[4:8] == b"TFL3"
        assert data != models[m.source]
        assert read_model(data).subgraphs  # the object API reads it back
