"""Behaviour under load and failure, over real HTTP: micro-batching, the bounded queue, the
database going away and coming back; and the Alembic migrations on PostgreSQL."""
from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from service.store.session import upgrade
from tests.service.conftest import LiveServer, TcpProxy, make_settings
from tests.support import create_database, drop_database

SENTENCES = ["Anna Berg visited Paris .", "Tom works for Globex in Oslo .", "Initech hired Olga yesterday .", "Chen Wei and Tom met ."]


def metric_value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def _concurrent(url: str, n: int, body_for) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/tag", json=body_for(i)) for i in range(n)))


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer(tmp_path, small_model_dir):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    upgrade(url)
    with LiveServer(make_settings(url, small_model_dir, batch_max_wait_ms=20.0)) as server:
        names = ("ner_inference_batch_size_count", "ner_inference_batch_size_sum", 'ner_inference_batch_size_bucket{le="1.0"}')
        # the metrics live in the process-wide registry: earlier tests counted too, so take differences
        before = httpx.get(f"{server.url}/metrics").text
        texts = [f"{SENTENCES[i % 4]} {i}" for i in range(48)]
        responses = asyncio.run(_concurrent(server.url, len(texts), lambda i: {"text": texts[i], "include_tokens": True}))
        for text, r in zip(texts, responses, strict=True):
            assert r.status_code == 200, r.text
            tokens = [t["text"] for t in r.json()["tokens"]]
            assert tokens == text.split()  # its own text, not a neighbour's
        after = httpx.get(f"{server.url}/metrics").text
        batches, texts_tagged, singles = (metric_value(after, n) - metric_value(before, n) for n in names)
        assert texts_tagged == 48
        assert batches < 48, f"{batches} forward passes for 48 concurrent requests: nothing was merged"
        assert singles < batches  # some batch held several texts


def test_full_queue_answers_503_with_retry_after(tmp_path, small_model_dir):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    upgrade(url)
    settings = make_settings(url, small_model_dir, queue_max_texts=4, max_batch_texts=4, batch_max_texts=1, batch_max_wait_ms=50.0)
    with LiveServer(settings) as server:
        rejected_before = metric_value(httpx.get(f"{server.url}/metrics").text, "ner_queue_rejected_total")
        responses = asyncio.run(_concurrent(server.url, 40, lambda i: {"texts": [SENTENCES[i % 4]] * 4, "store": False}))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.json()["error"]["code"] == "overloaded" and int(rejected.headers["Retry-After"]) >= 1
        counted = metric_value(httpx.get(f"{server.url}/metrics").text, "ner_queue_rejected_total") - rejected_before
        assert counted == 4 * codes.count(503)


@pytest.mark.postgres
def test_database_down_then_back(pg_server_url, small_model_dir):
    proxy = TcpProxy().start()
    url = pg_server_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    upgrade(url)
    try:
        with LiveServer(make_settings(url, small_model_dir, db_timeout_s=1.0)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
            before = c.post("/tag", json={"text": "Tom visited Oslo ."}).json()
            assert before["stored"] is True
            failures_before = metric_value(c.get("/metrics").text, "ner_feedback_store_failures_total")
            store_errors_before = metric_value(c.get("/metrics").text, 'ner_db_errors_total{operation="store_prediction"}')
            proxy.cut()
            down = c.post("/tag", json={"text": "Tom visited Oslo ."})
            assert down.status_code == 200
            assert down.json()["stored"] is False and down.json()["id"] is None and down.json()["entities"]
            fb = c.post("/feedback", json={"prediction_id": before["id"], "entities": []}, headers={"Idempotency-Key": "k-down"})
            assert fb.status_code == 503 and fb.json()["error"]["code"] == "database_unavailable" and "Retry-After" in fb.headers
            fb_new = c.post("/feedback", json={"text": "Tom left .", "entities": []})
            assert fb_new.status_code == 503
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unavailable")
            assert c.get("/healthz").status_code == 200
            metrics = c.get("/metrics").text
            assert metric_value(metrics, "ner_feedback_store_failures_total") - failures_before == 2
            assert metric_value(metrics, 'ner_db_errors_total{operation="store_prediction"}') - store_errors_before == 1

            proxy.restore()
            assert c.get("/readyz").status_code == 200
            after = c.post("/tag", json={"text": "Tom visited Oslo ."}).json()
            assert after["stored"] is True
            retried = c.post("/feedback", json={"prediction_id": before["id"], "entities": []}, headers={"Idempotency-Key": "k-down"})
            assert retried.status_code == 201
    finally:
        proxy.stop()


@pytest.mark.postgres
def test_migrations_upgrade_downgrade_upgrade_and_match_the_orm(pg_server_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, inspect

    from service.store.session import code_revision, database_revision, downgrade
    from service.store.tables import Base

    # a database of its own: the shared test database is in use by other tests
    url = create_database("ner_mig")
    engine = create_engine(url)
    try:
        assert database_revision(engine) is None
        upgrade(url)
        assert database_revision(engine) == code_revision()
        assert {"documents", "predictions", "annotations", "models"} <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"the ORM and the migrations disagree: {diff}"
        downgrade(url, "base")
        assert database_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
        assert database_revision(engine) == code_revision()
    finally:
        engine.dispose()
        drop_database(url)


def test_sqlite_migrations_match_the_orm(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from service.store.tables import Base

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()
