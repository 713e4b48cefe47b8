"""Training-job metrics, read from the database at each scrape (registered by every API process
with ``service.metrics.add_collector``)."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from sqlalchemy.exc import SQLAlchemyError

from service import metrics
from service.store import training_jobs as jobs


class TrainingJobsCollector:
    """Training-job metrics read from the database at each scrape. The trainer (``ner worker``) is
    not scraped: it writes everything to ``training_jobs`` and ``models``, and any API process
    exports it from there, so the numbers survive trainer restarts and need no second target.
    Every API process and replica exports the same values: aggregate them with ``max``, not ``sum``."""

    def __init__(self, sessions) -> None:
        self.sessions = sessions

    def describe(self):
        return []  # collected lazily: no query when the collector is registered

    def collect(self):
        try:
            with self.sessions() as session:
                stats = jobs.job_stats(session)
                versions = jobs.heldout_f1_by_version(session)
        except SQLAlchemyError:
            metrics.DB_ERRORS.labels(operation="job_metrics").inc()
            return
        yield CounterMetricFamily("ner_training_jobs_started", "Training-job attempts started (a job taken again after its worker died counts again)", value=stats.started)
        yield CounterMetricFamily("ner_training_jobs_succeeded", "Training jobs that produced a model version", value=stats.succeeded)
        yield CounterMetricFamily("ner_training_jobs_failed", "Training jobs that failed", value=stats.failed)
        open_jobs = GaugeMetricFamily("ner_training_jobs_open", "Training jobs queued or running", labels=["status"])
        open_jobs.add_metric(["queued"], stats.queued)
        open_jobs.add_metric(["running"], stats.running)
        yield open_jobs
        yield SummaryMetricFamily("ner_training_job_duration_seconds", "Wall time of finished training jobs", count_value=stats.duration_count, sum_value=stats.duration_sum)
        yield GaugeMetricFamily("ner_training_last_success_timestamp_seconds", "End of the last successful training job (Unix time; 0: none yet)", value=stats.last_success or 0.0)
        yield GaugeMetricFamily("ner_corrections_not_trained", "Accepted corrections stored since the last successful training job was queued", value=stats.corrections_pending)
        f1 = GaugeMetricFamily("ner_model_heldout_f1", "F1 of a model version on the held-out corrections, measured when it was trained", labels=["name", "version"])
        for name, version, value in versions:
            f1.add_metric([name, version], value)
        yield f1
