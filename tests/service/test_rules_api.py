"""Entity rules through the service (docs/rules.md): /admin/rules (add, remove, replace, import,
export, versions, rollback, dry run) on SQLite and PostgreSQL, rules on /tag in both modes, the
per-request min_score / labels filters, bad input answered 422 naming the line, and metrics."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, text

from tests.service.conftest import make_settings, running_app

ADMIN = {"X-Admin-Key": "r" * 24}
TEXT = "Tom works for Globex in Paris . the widget pro is new ."


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rules.db'}"
    else:
        yield request.getfixturevalue("fresh_pg_url")


@pytest.fixture
def api(db_url, small_model_dir):
    with running_app(make_settings(db_url, small_model_dir, admin_key=ADMIN["X-Admin-Key"], extra_labels=["PRODUCT"])) as c:
        yield c


def ents(response) -> list[tuple]:
    assert response.status_code == 200, response.text
    return [(e["text"], e["label"], e["source"], e["rule_id"]) for e in response.json()["entities"]]


def test_rules_apply_on_tag_and_every_change_is_a_version(api):
    assert ents(api.post("/tag", json={"text": TEXT})) == [("Tom", "PER", "model", None), ("Globex", "ORG", "model", None), ("Paris", "LOC", "model", None)]
    r = api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "widget pro", "label": "PRODUCT"}, {"phrase": "Tom", "label": "ORG", "case_sensitive": True}], "author": "ann"})
    assert r.status_code == 201, r.text
    assert r.json() | {"created_at": None} == {"version": 1, "parent": 0, "mode": "override", "action": "add", "rule_count": 2, "author": "ann", "note": None, "created_at": None}
    listed = api.get("/admin/rules", headers=ADMIN).json()
    ids = {rule["phrase"]: rule["id"] for rule in listed["rules"]}
    assert listed["version"] == 1 and listed["total"] == 2
    widget, tom = ids["widget pro"], ids["Tom"]
    assert ents(api.post("/tag", json={"text": TEXT})) == [
        ("Tom", "ORG", "rule", tom), ("Globex", "ORG", "model", None), ("Paris", "LOC", "model", None), ("widget pro", "PRODUCT", "rule", widget),
    ]
    # fill: only where the model found nothing
    assert api.put("/admin/rules/mode", headers=ADMIN, json={"mode": "fill", "author": "bob"}).json()["version"] == 2
    assert ents(api.post("/tag", json={"text": TEXT}))[0] == ("Tom", "PER", "model", None)
    # remove one: the other keeps its id
    assert api.delete(f"/admin/rules/{tom}", headers=ADMIN, params={"author": "cy"}).json()["rule_count"] == 1
    assert api.get("/admin/rules", headers=ADMIN).json()["rules"][0]["id"] == widget
    assert api.post("/admin/rules/remove", headers=ADMIN, json={"ids": [tom]}).status_code == 404  # not in the set any more
    versions = api.get("/admin/rules/versions", headers=ADMIN).json()
    assert [(v["version"], v["action"], v["author"], v["rule_count"], v["mode"]) for v in versions] == [(3, "remove", "cy", 1, "fill"), (2, "mode", "bob", 2, "fill"), (1, "add", "ann", 2, "override")]
    # rollback to version 1: a new version with its rules and mode
    back = api.post("/admin/rules/versions/1/rollback", headers=ADMIN, json={"author": "dee"}).json()
    assert (back["version"], back["action"], back["mode"], back["rule_count"], back["author"]) == (4, "rollback", "override", 2, "dee")
    assert ents(api.post("/tag", json={"text": TEXT}))[0] == ("Tom", "ORG", "rule", tom)
    assert api.post("/admin/rules/versions/99/rollback", headers=ADMIN).status_code == 404


def test_export_and_import_round_trip(api):
    rules = [{"phrase": "Acme, Inc.", "label": "ORG", "note": 'said "hi"'}, {"pattern": [{"lower": "model"}, {"shape": "dd"}], "label": "PRODUCT", "case_sensitive": True}]
    assert api.post("/admin/rules", headers=ADMIN, json={"rules": rules}).status_code == 201
    for fmt in ("jsonl", "csv"):
        exported = api.get("/admin/rules/export", headers=ADMIN, params={"format": fmt})
        assert exported.status_code == 200
        content = "text/csv" if fmt == "csv" else "application/x-ndjson"
        r = api.post("/admin/rules/import", headers={**ADMIN, "Content-Type": content}, params={"replace": "true", "author": "imp"}, content=exported.content)
        assert r.status_code == 201, r.text
        again = api.get("/admin/rules", headers=ADMIN).json()["rules"]
        assert [{k: v for k, v in x.items() if k not in ("id", "author") and v not in (None, False)} for x in again] == [
            {k: v for k, v in x.items() if v not in (None, False)} for x in rules
        ]
    r = api.post("/tag", json={"text": "Acme, Inc. sold Model 42 ."})
    assert [(e["text"], e["label"], e["source"]) for e in r.json()["entities"]] == [("Acme, Inc.", "ORG", "rule"), ("Model 42", "PRODUCT", "rule")]


def test_a_bad_import_names_each_line_and_stores_nothing(api):
    body = "\n".join([
        json.dumps({"phrase": "ok", "label": "ORG"}),
        json.dumps({"phrase": "  ", "label": "ORG"}),
        json.dumps({"phrase": "x" * 300, "label": "ORG"}),
        json.dumps({"phrase": "food", "label": "FOOD"}),
        "not json",
        json.dumps({"phrase": "OK", "label": "PER"}),
    ])
    r = api.post("/admin/rules/import", headers=ADMIN, content=body.encode())
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_rules" and error["message"].startswith("5 bad rule(s), nothing stored; first: line 2:")
    assert [(d["line"], d["error"].split(":")[0]) for d in error["details"]] == [
        (2, "'phrase' is empty or only whitespace"), (3, "'phrase' has 300 characters; the limit is 200"), (4, "unknown label 'FOOD'"), (5, "not JSON"), (6, "duplicate of the rule on line 1"),
    ]
    assert api.get("/admin/rules/versions", headers=ADMIN).json() == []
    csv_bad = api.post("/admin/rules/import", headers={**ADMIN, "Content-Type": "text/csv"}, content=b"label,phrase,colour\nORG,a,red\n")
    assert csv_bad.status_code == 422 and "unknown column 'colour'" in csv_bad.json()["error"]["message"]
    # a rule that duplicates one already in the set, through the JSON API: named by its index
    assert api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "Globex", "label": "ORG"}]}).status_code == 201
    dup = api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "new", "label": "ORG"}, {"phrase": "GLOBEX", "label": "PER"}]})
    assert dup.status_code == 422 and "rules[1]: duplicate of a rule already in the set" in dup.json()["error"]["message"]
    assert len(api.get("/admin/rules/versions", headers=ADMIN).json()) == 1


def test_rule_limits(db_url, small_model_dir):
    settings = make_settings(db_url, small_model_dir, admin_key=ADMIN["X-Admin-Key"], rules_max=3, rule_max_chars=10)
    with running_app(settings) as api:
        r = api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": f"n{i}", "label": "ORG"} for i in range(4)]})
        assert r.status_code == 422 and "4 rules; the limit is 3" in r.json()["error"]["message"]
        r = api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "a long phrase", "label": "ORG"}]})
        assert r.status_code == 422 and "rules[0]: 'phrase' has 13 characters; the limit is 10" in r.json()["error"]["message"]
        assert api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": f"n{i}", "label": "ORG"} for i in range(3)]}).status_code == 201
        r = api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "n9", "label": "ORG"}]})
        assert r.status_code == 422 and "the rule set: 4 rules; the limit is 3" in r.json()["error"]["message"]


def test_dry_run_shows_what_would_change_and_stores_nothing(api):
    for t in ("Tom visited Paris .", "nothing happened today ."):
        assert api.post("/tag", json={"text": t}).status_code == 200
    r = api.post("/admin/rules/dry-run", headers=ADMIN, json={"add": [{"phrase": "Paris", "label": "ORG"}], "sample": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["sampled"], body["changed"], body["rules_after"], body["current_version"]) == (2, 1, 1, None)
    (changed,) = body["texts"]
    assert changed["text"] == "Tom visited Paris ."
    assert [(e["text"], e["label"], e["source"]) for e in changed["added"]] == [("Paris", "ORG", "rule")]
    assert [(e["text"], e["label"], e["source"]) for e in changed["removed"]] == [("Paris", "LOC", "model")]
    assert api.get("/admin/rules/versions", headers=ADMIN).json() == []
    assert api.post("/admin/rules/dry-run", headers=ADMIN, json={"add": [{"phrase": "", "label": "ORG"}]}).status_code == 422


def test_tag_filters(api, db_url):
    plain = api.post("/tag", json={"text": TEXT}).json()["entities"]
    scores = sorted(e["score"] for e in plain)
    threshold = scores[1]
    kept = api.post("/tag", json={"text": TEXT, "min_score": threshold}).json()["entities"]
    assert kept == [e for e in plain if e["score"] >= threshold] and len(kept) < len(plain)
    assert [e["label"] for e in api.post("/tag", json={"texts": [TEXT], "labels": ["LOC", "PER"]}).json()["results"][0]["entities"]] == ["PER", "LOC"]
    # the stored prediction keeps every entity
    r = api.post("/tag", json={"text": TEXT, "labels": ["LOC"]}).json()
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT entities FROM predictions WHERE id = :id"), {"id": r["id"].replace("-", "") if db_url.startswith("sqlite") else r["id"]}).scalar()
    finally:
        engine.dispose()
    assert len(stored if isinstance(stored, list) else json.loads(stored)) == 3 and len(r["entities"]) == 1


@pytest.mark.parametrize(("body", "code", "needle"), [
    ({"min_score": 1.5}, "invalid_request", "min_score"),
    ({"min_score": -0.1}, "invalid_request", "min_score"),
    ({"min_score": "high"}, "invalid_request", "min_score"),
    ({"labels": []}, "invalid_request", "labels"),
    ({"labels": ["PER", "FOOD"]}, "unknown_label", "'FOOD'"),
])
def test_tag_refuses_bad_filters(api, body, code, needle):
    r = api.post("/tag", json={"text": "Tom .", **body})
    assert r.status_code == 422 and r.json()["error"]["code"] == code and needle in r.json()["error"]["message"]


def test_deployment_defaults_and_a_bad_default(sqlite_url, small_model_dir):
    with running_app(make_settings(sqlite_url, small_model_dir, tag_labels=["LOC"])) as api:
        assert [e["label"] for e in api.post("/tag", json={"text": TEXT}).json()["entities"]] == ["LOC"]
        assert [e["label"] for e in api.post("/tag", json={"text": TEXT, "labels": ["PER"]}).json()["entities"]] == ["PER"]
    with pytest.raises(ValueError, match="TAG_LABELS / TAG_MIN_SCORE: unknown label 'FOOD'"), running_app(make_settings(sqlite_url, small_model_dir, tag_labels=["FOOD"])):
        pass


def test_feedback_accepts_entities_as_tag_returned_them(api):
    r = api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "widget pro", "label": "PRODUCT"}]})
    assert r.status_code == 201
    tagged = api.post("/tag", json={"text": TEXT}).json()
    fb = api.post("/feedback", json={"prediction_id": tagged["id"], "entities": tagged["entities"]})
    assert fb.status_code == 201, fb.text


def _metric(client, series: str) -> float:
    """The value of one series of /metrics (0 when absent): counters are per process, so tests compare before and after."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rule_metrics(api):
    series = [
        'ner_rule_matches_total{label="PRODUCT",result="applied"}', 'ner_rule_matches_total{label="ORG",result="skipped"}',
        'ner_rule_replaced_model_entities_total{label="LOC"}', 'ner_entities_tagged_total{label="PRODUCT",source="rule"}',
    ]
    before = [_metric(api, s) for s in series]
    api.post("/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "widget pro", "label": "PRODUCT"}, {"phrase": "Paris", "label": "ORG"}]})
    api.post("/tag", json={"text": TEXT})
    api.put("/admin/rules/mode", headers=ADMIN, json={"mode": "fill"})
    api.post("/tag", json={"text": TEXT})
    after = [_metric(api, s) for s in series]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1, 2]
    assert _metric(api, "ner_rule_set_version") == 2 and _metric(api, "ner_rules") == 2


def test_admin_rules_need_the_admin_key(api):
    assert api.get("/admin/rules").status_code == 401
    assert api.post("/admin/rules", json={"rules": [{"phrase": "x", "label": "ORG"}]}).status_code == 401


def test_two_changes_from_one_version_cannot_both_be_stored(db_url):
    from ml.rules import Rule
    from service.store import rules as store
    from service.store.session import make_engine, make_sessionmaker, upgrade

    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            first = store.create_version(session, parent=0, mode="override", action="add", author="a", note=None, new=[Rule("ORG", "Acme")])
        with sessions() as session, pytest.raises(store.RuleSetConflict, match="version 0 already has a successor"):
            store.create_version(session, parent=0, mode="override", action="add", author="b", note=None, new=[Rule("ORG", "Globex")])
        with sessions() as session:
            assert [v.id for v in store.list_versions(session)] == [first.id]
            assert [r.phrase for r in store.rules_of(session, version=first.id)] == ["Acme"]
            assert session.execute(text("SELECT count(*) FROM rules")).scalar() == 1  # the refused change left no rule behind
    finally:
        engine.dispose()
