"""Every Prometheus metric of the service, named in one place.

With several uvicorn workers, ``ner serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker
imports prometheus_client; each worker then writes its values to files there and ``/metrics``
aggregates them (gauges say how: ``livesum`` adds live processes, ``liveall`` keeps one series each).
"""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

HTTP_REQUESTS = Counter("ner_http_requests_total", "HTTP requests answered", ["route", "method", "status"])
HTTP_LATENCY = Histogram("ner_http_request_duration_seconds", "Time to answer an HTTP request", ["route", "method", "status"], buckets=LATENCY_BUCKETS)

BATCH_SIZE = Histogram("ner_inference_batch_size", "Texts merged into one forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_SENTENCES = Histogram("ner_inference_batch_sentences", "Sentences in one forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
INFERENCE_LATENCY = Histogram("ner_inference_duration_seconds", "Tokenization and forward pass of one batch", buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("ner_queue_depth", "Texts waiting for the model", multiprocess_mode="livesum")
QUEUE_CAPACITY = Gauge("ner_queue_capacity", "Texts the queue holds before /tag answers 503", multiprocess_mode="livesum")
QUEUE_REJECTED = Counter("ner_queue_rejected_total", "Texts refused because the queue was full")

TOKENS = Counter("ner_tokens_tagged_total", "Tokens tagged")
ENTITIES = Counter("ner_entities_tagged_total", "Entities found, by label and source (model or rule)", ["label", "source"])
RULE_MATCHES = Counter(
    "ner_rule_matches_total", "Entity rule matches, by label and what became of them: applied, or skipped (fill mode: the model found something there)",
    ["label", "result"],
)
RULE_REPLACED = Counter("ner_rule_replaced_model_entities_total", "Model entities a rule match replaced (override mode), by the model's label", ["label"])
RULE_SET_VERSION = Gauge("ner_rule_set_version", "The entity rule set version this worker applies (0: none)", multiprocess_mode="liveall")
RULES_LOADED = Gauge("ner_rules", "Rules in the rule set this worker applies", multiprocess_mode="liveall")
RULES_LOAD_SECONDS = Histogram("ner_rule_set_load_seconds", "Time to compile a rule set (tokenizing its phrases)", buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0))
PREDICTIONS_STORED = Counter("ner_predictions_stored_total", "Predictions written to the database")
PREDICTIONS_NOT_STORED = Counter("ner_predictions_not_stored_total", "Predictions answered without being stored (database unavailable)")

FEEDBACK = Counter("ner_feedback_received_total", "Corrections stored", ["source"])
FEEDBACK_FAILED = Counter("ner_feedback_store_failures_total", "Corrections the database could not take (answered 503)")

DB_ERRORS = Counter("ner_db_errors_total", "Database operations that failed", ["operation"])
MODEL_INFO = Gauge("ner_model_info", "The model version this worker serves (value 1)", ["name", "version"], multiprocess_mode="liveall")
MODEL_SWITCHES = Counter("ner_model_switches_total", "Model versions activated without a restart", ["result"])


# Labelled series exist only once a label value is used, and Prometheus cannot see the first
# increment of a series it has never scraped: create the known ones at zero.
for _operation in ("session", "store_prediction", "store_feedback", "export", "readyz", "job_metrics"):
    DB_ERRORS.labels(operation=_operation)
for _source in ("prediction", "text"):
    FEEDBACK.labels(source=_source)
for _result in ("ok", "failed", "refused"):
    MODEL_SWITCHES.labels(result=_result)


_extra: list = []


def add_collector(collector) -> None:
    """Export ``collector`` too (outside the multiprocess files: it computes its values itself)."""
    _extra.append(collector)


def remove_collector(collector) -> None:
    if collector in _extra:
        _extra.remove(collector)


_served: list = []


def set_model_info(name: str, version: str) -> None:
    # zero the previous version instead of clearing it: in multiprocess mode a cleared series
    # would keep its last value in the worker's file
    for old in _served:
        MODEL_INFO.labels(name=old[0], version=old[1]).set(0)
    _served[:] = [(name, version)]
    MODEL_INFO.labels(name=name, version=version).set(1)


def worker_exited() -> None:
    """Drop this process's live gauges (queue depth, model info) from the multiprocess totals."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())


def render() -> tuple[bytes, str]:
    """The exposition text; aggregated over worker processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    payload = generate_latest(registry)
    if _extra:
        extra = CollectorRegistry(auto_describe=False)
        for collector in _extra[-1:]:  # one per process; the latest app's (tests build several)
            extra.register(collector)
        payload += generate_latest(extra)
    return payload, CONTENT_TYPE_LATEST
