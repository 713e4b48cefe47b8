"""The application factory. Importing this module builds nothing; ``create_app`` builds the app and
its lifespan loads the model, the tokenizer and the database engine."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys

import torch
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from service import metrics, security
from service.api import error_handlers, openapi
from service.api.deps import require_probe_key
from service.api.middleware import BodyLimit, RequestMetrics
from service.api.routes import annotations as annotation_routes
from service.api.routes import documents, feedback, health, jobs, models, predictions, rules, tag
from service.api.routes.annotate import router as annotate_page
from service.config import Settings
from service.serving.engine import TaggingEngine
from service.serving.model import ServedModel
from service.serving.registry import follow_active, initial_model
from service.serving.rules import follow_rules, initial_rules
from service.serving.runtime import Runtime
from service.serving.tagging import prediction_writer
from service.store.session import check_schema, make_engine, make_sessionmaker, upgrade
from service.training.collector import TrainingJobsCollector

log = logging.getLogger("service")


def create_app(settings: Settings | None = None) -> FastAPI:
    config = settings or Settings()
    # before anything is built: an open API on a public address is refused (ALLOW_NO_AUTH overrides)
    security.check_exposure(config.bind_host, config.key_ring, config.allow_no_auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(config.torch_threads)
        # the event loop, the inference thread and the writer share one GIL: with Python's default
        # 5 ms switch interval a thread that wants it can wait that long (docs/design-decisions.md)
        sys.setswitchinterval(config.gil_switch_ms / 1000.0)
        engine = make_engine(config.database_url, config.db_timeout_s)
        if config.auto_migrate:
            await asyncio.to_thread(upgrade, config.database_url)
        await asyncio.to_thread(check_schema, engine)
        sessions = make_sessionmaker(engine)
        model = await asyncio.to_thread(_initial_model, config, sessions)
        tagging = TaggingEngine(model, config, await asyncio.to_thread(_initial_rules, config, sessions, model)).start()
        # predictions have their own engine: without PREDICTIONS_FSYNC their commits skip the disk
        # wait (docs/configuration.md, PREDICTIONS_FSYNC): at concurrency 1 that wait was a third to a half of a
        # one-sentence request's time (docs/benchmarks/history.md, Speed)
        writer_engine = engine if config.predictions_fsync else make_engine(config.database_url, config.db_timeout_s, pool_size=2, fsync=False)
        writer = prediction_writer(writer_engine, config).start()
        app.state.runtime = Runtime(config, engine, sessions, tagging, writer, writer_engine)
        job_metrics = TrainingJobsCollector(sessions)
        metrics.add_collector(job_metrics)
        # move everything built so far (torch, spaCy, the model) out of the garbage collector's
        # reach: full collections then scan only per-request objects (shorter pauses, lower p99)
        gc.collect()
        gc.freeze()
        # every worker follows the active model version and the newest rule set version
        pollers = [asyncio.create_task(f(tagging, sessions, config.model_poll_s)) for f in (follow_active, follow_rules)] if config.model_poll_s > 0 else []
        log.info("serving %s %s; database %s", model.name, model.version, engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            for poller in pollers:
                poller.cancel()
            tagging.close()
            writer.close()
            metrics.remove_collector(job_metrics)
            engine.dispose()
            writer_engine.dispose()
            metrics.worker_exited()

    app = FastAPI(
        title="NER service",
        description="Named entities with character offsets from a bidirectional recurrent tagger; corrections feed the next model.",
        version="0.1.0",
        lifespan=lifespan,
        # served by service.api.openapi behind the probe key (PROTECT_PROBES), with the real error bodies
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    error_handlers.install(app)
    app.include_router(annotate_page)
    for router in (tag.router, predictions.router, feedback.router, annotation_routes.router, documents.router, models.router, models.admin, rules.router, jobs.router, health.router):
        app.include_router(router)
    openapi.install(app, require_probe_key, config.key_ring.guarded, config.protect_probes)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s, larger={"/admin/rules": config.rules_max_body_bytes})
    app.add_middleware(security.HeaderChecks, hosts=security.allowed_hosts(config.allowed_hosts, config.bind_host))
    app.add_middleware(RequestMetrics)
    return app


def _initial_model(config: Settings, sessions: sessionmaker[Session]) -> ServedModel:
    # start-up runs outside any request: the lifespan opens this one session itself
    with sessions() as session:
        return initial_model(config, session)


def _initial_rules(config: Settings, sessions: sessionmaker[Session], model: ServedModel):
    with sessions() as session:
        return initial_rules(config, session, model)
