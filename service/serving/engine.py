"""The tagging engine: the served model (swappable without a restart) behind two micro-batching
lanes, each with its own inference thread."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from ml.pipeline import TextResult
from ml.rules import RuleSet
from service import metrics
from service.config import Settings
from service.serving.batching import MicroBatcher
from service.serving.model import ServedModel, ServedResult

log = logging.getLogger("service.serving.engine")


def set_thread_torch_threads(n: int) -> None:
    """TORCH_THREADS for the calling thread. OpenMP keeps its thread count per thread: a thread
    started after ``torch.set_num_threads`` in the main thread still runs OpenMP regions (the LSTM's
    matrix products) on as many threads as there are cores. Two workers' inference threads then ran
    four spinning OpenMP threads on two cores, and two workers on one machine collapsed now and
    then (docs/design-decisions.md, Threads per worker)."""
    torch.set_num_threads(n)


class TaggingEngine:
    """Owns the served model, the entity rules applied after it, and the inference batchers.
    ``switch`` and ``set_rules`` replace them between two batches: a batch always runs on one model
    and one rule set, and a request in flight is never failed by either.

    Two lanes, each a batcher with its own thread: requests of at most SMALL_REQUEST_CHARS
    characters in all, and the others. A one-sentence request then never waits behind a batch of
    100,000-character texts (torch and the chunked tokenizer let the two threads share the CPU);
    both queues are bounded by characters (QUEUE_MAX_CHARS) as well as texts."""

    def __init__(self, model: ServedModel, settings: Settings, rules: RuleSet | None = None):
        self.model = model
        self.settings = settings
        self.rules = rules if rules is not None else RuleSet([], tokenize=str.split)
        self._rules_info(self.rules)

        def lane(name: str) -> MicroBatcher[str, ServedResult]:
            return MicroBatcher(
                self._process, settings.batch_max_texts, settings.batch_max_wait_ms, settings.queue_max_texts,
                name=name, on_depth=self._depth, weight=len, max_weight=settings.queue_max_chars,
                inline=lambda texts: sum(len(t) for t in texts) <= settings.inline_max_chars,
                on_thread_start=lambda: set_thread_torch_threads(settings.torch_threads),
            )

        self.small = lane("inference-small")
        self.batcher = lane("inference")  # the lane of large requests
        metrics.QUEUE_CAPACITY.set(settings.queue_max_texts)
        metrics.set_model_info(model.name, model.version)

    def _depth(self, _depth: int) -> None:
        metrics.QUEUE_DEPTH.set(self.small.depth + self.batcher.depth)

    def start(self) -> TaggingEngine:
        self.small.start()
        self.batcher.start()
        return self

    def close(self) -> None:
        self.small.close()
        self.batcher.close()

    def switch(self, model: ServedModel) -> ServedModel:
        old, self.model = self.model, model  # one reference assignment: atomic for the worker thread
        metrics.set_model_info(model.name, model.version)
        metrics.MODEL_SWITCHES.labels(result="ok").inc()
        log.info("now serving %s %s (was %s %s)", model.name, model.version, old.name, old.version)
        return old

    def set_rules(self, rules: RuleSet) -> RuleSet:
        old, self.rules = self.rules, rules  # one reference assignment, read once per batch
        self._rules_info(rules)
        log.info("now applying rule set version %s (%d rules, %s; was version %s)", rules.version, len(rules), rules.mode, old.version)
        return old

    @staticmethod
    def _rules_info(rules: RuleSet) -> None:
        metrics.RULE_SET_VERSION.set(rules.version or 0)
        metrics.RULES_LOADED.set(len(rules))

    def _process(self, texts: list[str]) -> list[ServedResult]:
        model, rules = self.model, self.rules
        started = time.perf_counter()
        results = model.tagger.tag(texts, rules=rules)
        seconds = time.perf_counter() - started
        metrics.BATCH_SIZE.observe(len(texts))
        metrics.INFERENCE_LATENCY.observe(seconds)
        metrics.BATCH_SENTENCES.observe(sum(r.sentences for r in results))
        metrics.TOKENS.inc(sum(len(r.tokens) for r in results))
        for r in results:
            _count(r)
        return [ServedResult(r, model) for r in results]

    async def tag(self, texts: Sequence[str]) -> list[ServedResult]:
        small = sum(len(t) for t in texts) <= self.settings.small_request_chars
        return await (self.small if small else self.batcher).submit(list(texts))


def _count(result: TextResult) -> None:
    for e in result.entities:
        metrics.ENTITIES.labels(label=e.label, source=e.source).inc()
    if result.rules is not None:
        for f in result.rules.entities:
            if f.source == "rule":
                metrics.RULE_MATCHES.labels(label=f.label, result="applied").inc()
        for f in result.rules.skipped:
            metrics.RULE_MATCHES.labels(label=f.label, result="skipped").inc()
        for f in result.rules.replaced:
            metrics.RULE_REPLACED.labels(label=f.label).inc()
