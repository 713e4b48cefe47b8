"""The prediction writer's store: bulk INSERTs through the DB-API cursor must store exactly what the
ORM reads back (UUIDs, timezone-aware datetimes, JSON, NULL text), on SQLite and PostgreSQL, commit
all or nothing, and fail with SQLAlchemy's errors (parameters hidden: they hold users' texts)."""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from service.store.repositories import PredictionRecord, PredictionStore, sha256
from service.store.session import make_engine, make_sessionmaker, upgrade
from service.store.tables import Document, Prediction, new_ids

TEXTS = ["Tom visited Oslo .", "Zoë met Ünal in Köln — 東京 🏳️‍🌈 .", "It's \"quoted\" ; DROP TABLE documents; --"]


def _records() -> list[PredictionRecord]:
    entities = [[{"start": 0, "end": 3, "label": "PER", "text": "Tom", "score": 0.987654}], [{"start": 15, "end": 19, "label": "LOC", "text": "Köln", "score": 0.5}], []]
    return [PredictionRecord(i, t, "en-test", "1.2.3", e, 0.25 + k / 10, 1.5 * k) for k, (i, t, e) in enumerate(zip(new_ids(3), TEXTS, entities, strict=True))]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    return url


@pytest.mark.parametrize("fsync", [True, False])
def test_stored_predictions_read_back_through_the_orm(database_url, fsync):
    engine = make_engine(database_url, fsync=fsync)
    records = _records()
    before = dt.datetime.now(dt.UTC)
    PredictionStore(engine).store(records, store_text=True)
    PredictionStore(engine).store([PredictionRecord(*new_ids(1), "Ann .", "en-test", "1.2.3", [], 1.0, 0.0)], store_text=False)
    with make_sessionmaker(engine)() as session:
        for r in records:
            p = session.get(Prediction, r.id)
            assert p is not None
            assert (p.model_name, p.model_version, p.entities, p.min_score, p.latency_ms) == (r.model_name, r.model_version, r.entities, r.min_score, r.latency_ms)
            assert p.document.text == r.text and p.document.text_sha256 == sha256(r.text) and p.document.length == len(r.text)
            created = p.created_at if p.created_at.tzinfo else p.created_at.replace(tzinfo=dt.UTC)  # SQLite keeps no zone
            assert before - dt.timedelta(seconds=1) <= created <= dt.datetime.now(dt.UTC)
        unstored = session.scalars(select(Document).where(Document.text_sha256 == sha256("Ann ."))).one()
        assert unstored.text is None and unstored.length == 5
        assert session.scalar(select(func.count()).select_from(Prediction)) == 4
    engine.dispose()


def test_a_failed_batch_commits_nothing_and_raises_sqlalchemys_error(database_url):
    engine = make_engine(database_url)
    store = PredictionStore(engine)
    records = _records()
    store.store(records[:1], store_text=True)
    secret = "Secret Person lives at 1 Hidden Road ."
    again = [PredictionRecord(*new_ids(1), secret, "en-test", "1.2.3", [], 1.0, 0.0), records[0]]  # records[0]'s id is taken
    with pytest.raises(IntegrityError) as raised:
        store.store(again, store_text=True)
    assert secret not in str(raised.value)
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 1
        assert session.scalar(select(func.count()).select_from(Document)) == 1
    store.store(records[1:], store_text=True)  # the pooled connection is usable after the rollback
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 3
    engine.dispose()


@pytest.mark.postgres
def test_an_unreachable_database_raises_sqlalchemys_operational_error():
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none", timeout_s=1)
    with pytest.raises(OperationalError):
        PredictionStore(engine).store(_records(), store_text=True)
