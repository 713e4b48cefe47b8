"""The bundled model as a user meets it: text as people type it (all lower-case, all capitals) still
gets its entities, and GET /model reports the casing-robustness table stored in its metrics.json."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.conftest import make_settings, running_app

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "en-conll03"
SENTENCE = "i met barack obama and angela merkel in paris yesterday."


@pytest.fixture(scope="module")
def bundled_client(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('bundled') / 'ner.db'}"
    with running_app(make_settings(url, BUNDLED)) as client:
        yield client


@pytest.mark.parametrize("text", [SENTENCE, SENTENCE.upper(), SENTENCE.title()])
def test_names_are_found_whatever_the_casing(bundled_client, text):
    response = bundled_client.post("/tag", json={"text": text, "store": False})
    assert response.status_code == 200, response.text
    found = {(e["text"].lower(), e["label"]) for e in response.json()["entities"]}
    assert {("barack obama", "PER"), ("angela merkel", "PER"), ("paris", "LOC")} <= found
    for e in response.json()["entities"]:
        assert text[e["start"] : e["end"]] == e["text"]


def test_model_reports_its_robustness_table(bundled_client):
    body = bundled_client.get("/model").json()
    table = body["metrics"]["robustness"]["f1"]
    assert set(table) == {"dev", "test", "conll++", "wikigold"}
    for scores in table.values():
        assert set(scores) == {"as_is", "lower", "upper", "title"}
    # the point of the model: lower-cased and upper-cased newswire within a few points of cased text
    assert table["test"]["lower"] > table["test"]["as_is"] - 5
    assert table["test"]["upper"] > table["test"]["as_is"] - 5
    assert "benchmarks/robustness.py" in body["metrics"]["robustness"]["command"]
