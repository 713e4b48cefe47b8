"""A property-based run of schemathesis (checks: all, "ignored auth" included) over every operation of
the real app on SQLite with the small model, with one admin key: no 5xx, every response conforms to
the documented schema, status codes and content types, and no declared key is ignored. Besides,
every accepted request is sent again with a second or malformed credential beside the key, which
must be refused (issue 24: ambiguity is never resolved silently). Fixed seed (derandomized),
bounded examples."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from tests.service.conftest import LiveServer, make_settings

ADMIN = "admin-key-for-schemathesis-0123"
# what may not ride along with a valid key: a second credential, valid, empty or of another scheme
BESIDE_THE_KEY = [("X-Admin-Key", ""), ("X-Admin-Key", ADMIN), ("Authorization", "Bearer "), ("Authorization", "Basic YTpi")]


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, small_model_dir):
    from service.store.session import upgrade

    tmp = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{tmp / 'ner.db'}"
    upgrade(url)
    # keys and protected probes, so that every operation really checks the key its schema declares
    settings_ = make_settings(url, small_model_dir, api_keys=[f"admin:{ADMIN}", "tag:" + "t" * 20], protect_probes=True, models_dir=tmp / "models")
    with LiveServer(settings_) as server:
        # something stored, so that reads and the queue have rows to return
        key = {"X-API-Key": ADMIN}
        httpx.post(server.url + "/tag", json={"texts": ["Tom visited Oslo .", "Anna met Bob in Rome ."]}, headers=key).raise_for_status()
        httpx.post(server.url + "/feedback", json={"text": "Tom visited Oslo .", "entities": [{"start": 0, "end": 3, "label": "PER"}]}, headers=key).raise_for_status()
        yield server.url


def _spec() -> dict:
    # the schema the running app serves, built from the routes alone (no model, no database)
    from service.config import Settings
    from service.main import create_app

    return create_app(Settings(api_keys=[f"admin:{ADMIN}", "tag:" + "t" * 20], protect_probes=True, _env_file=None)).openapi()


# POST /admin/rules/import takes a file as the body (JSONL or CSV): the generated string as it is
schemathesis.serializer.alias("application/x-ndjson", "text/plain")
schemathesis.serializer.alias("text/csv", "text/plain")
schema = schemathesis.openapi.from_dict(_spec())


@schema.parametrize()
@settings(max_examples=30, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_its_schema(case, fuzz_client):
    # a correction is valid only with labels of the model and spans on token boundaries of its text,
    # a model folder only if it holds a model, a retrain only with an existing base version and valid
    # fine-tuning settings: no schema can say that, so schema-valid requests to these are not
    # expected to be accepted (every other check still runs on them)
    semantic = case.operation.label in ("POST /feedback", "POST /admin/models", "POST /admin/retrain")
    # entity rules and /tag's labels name labels of the model (or EXTRA_LABELS), and a rule's phrase
    # must hold a token and be no duplicate (docs/rules.md): semantic as well
    semantic = semantic or case.operation.label in ("POST /admin/rules", "PUT /admin/rules", "POST /admin/rules/import", "POST /admin/rules/dry-run")
    semantic = semantic or (case.operation.label == "POST /tag" and isinstance(case.body, dict) and case.body.get("labels") is not None)
    response = case.call_and_validate(base_url=fuzz_client, headers={"X-API-Key": ADMIN}, excluded_checks=[positive_data_acceptance] if semantic else None)
    if 200 <= response.status_code < 300 and case.method.upper() != "DELETE":  # (a DELETE is not sent twice)
        name, value = BESIDE_THE_KEY[sum(map(ord, case.operation.label + repr(case.body))) % len(BESIDE_THE_KEY)]
        again = case.call(base_url=fuzz_client, headers={"X-API-Key": ADMIN, name: value})
        assert again.status_code == 401 and again.json()["error"]["code"] == "ambiguous_credentials", (name, again.text)
