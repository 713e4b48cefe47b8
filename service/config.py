"""All service settings in one class, read from the environment and ``.env``."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from service.security import KeyRing


class Settings(BaseSettings):
    # an empty variable (ADMIN_KEY= in a compose file) means unset, not an invalid empty key
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True, env_ignore_empty=True)

    database_url: str = Field("sqlite:///./ner.db", description="SQLAlchemy URL; Postgres as postgresql+psycopg://user:pass@host/db")
    ner_model: Path | None = Field(None, description="model folder to serve first (default: the active version in the database, else the bundled model)")
    auto_migrate: bool = Field(False, description="apply migrations at start-up (meant for the embedded SQLite default)")
    device: str = Field("cpu", description="where the model runs: cpu, cuda or cuda:N (needs a CUDA build of torch; docs/gpu.md)")

    # limits
    max_body_bytes: int = 512 * 1024
    max_text_chars: int = 100_000
    max_batch_texts: int = 64
    max_entities: int = 1000

    # micro-batching
    batch_max_texts: int = 64  # texts merged into one forward pass
    # how long the first text of a batch waits for company; 0 = take what is queued: while one batch
    # runs the next one fills up, so batches grow with the load and an idle server adds no delay
    batch_max_wait_ms: float = 0.0
    queue_max_texts: int = 2048  # beyond this, /tag answers 503 with Retry-After
    # the queue's bound in characters (the work is proportional to them, not to the number of texts):
    # a request that would push the queued characters past it is refused, a small one that fits is not
    queue_max_chars: int = Field(2_000_000, description="characters waiting for the model before /tag answers 503")
    small_request_chars: int = Field(2000, description="requests of at most this many characters in all are tagged in their own lane, never behind big ones")
    body_timeout_s: float = Field(30.0, description="a request body not received in full within this many seconds gets 408")
    torch_threads: int = 1  # per worker process
    # a request whose texts total at most this many characters is tagged in the request's own thread
    # when its lane is idle (no hand-off to the inference thread and back); 0 = never
    inline_max_chars: int = 2000
    # sys.setswitchinterval of each worker: how long a thread holding the GIL may keep it from the
    # others (Python's default is 5 ms; 0.5 ms gave 20-25 % more requests/s at concurrency 32)
    gil_switch_ms: float = 0.5

    # persistence
    store_text: bool = Field(True, description="False: keep only a SHA-256 of each text (feedback must then resend the text)")
    retention_days: float | None = Field(None, description="`ner db purge` deletes predictions, and texts nobody corrected, older than this; unset = keep")
    idempotency_ttl_hours: float = Field(24.0, description="an Idempotency-Key protects retries for this long; then it may be used again and `ner db purge` clears it")
    db_write_batch: int = 256
    predictions_fsync: bool = Field(
        False,
        description="true: every commit of /tag's stored predictions waits for the disk (fsync), as corrections, "
        "deletions and model changes always do; false: committed (visible, kept if the service crashes) "
        "without that wait, so a power loss can lose the last fraction of a second of predictions",
    )
    db_timeout_s: float = 3.0

    # security
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated `role:key` (roles: tag, annotate, read, admin) or plain `key` (= tag, annotate and read); empty = no authentication",
    )
    protect_probes: bool = Field(False, description="also require an API key for /healthz, /readyz, /metrics, /docs and /openapi.json")
    admin_key: str | None = Field(None, description="X-Admin-Key for /admin (the same as an admin:KEY entry of API_KEYS); unset = admin endpoints disabled unless API_KEYS has an admin key")
    allow_no_auth: bool = Field(False, description="serve without API keys on a non-loopback address (something in front authenticates)")
    bind_host: str = Field("127.0.0.1", description="the address the server binds (set by `ner serve --host`); used by the exposure and host checks")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Host header values answered; empty = loopback names and BIND_HOST (any on a wildcard bind); * = any")
    models_dir: Path | None = Field(None, description="model folders: POST /admin/models loads only inside this one, and the trainer writes new versions here (default: the bundled models/ folder)")

    # feedback
    allow_partial_spans: bool = Field(False, description="accept feedback spans that split a token (they are widened to whole tokens)")
    extra_labels: Annotated[list[str], NoDecode] = Field(default_factory=list, description="labels accepted in feedback besides the model's")

    # model versions
    model_poll_s: float = Field(2.0, description="how often each worker checks the database for a newly activated model and a new rule set version; 0 = never")

    # what /tag answers (docs/rules.md): deployment defaults of the request's min_score and labels
    tag_min_score: float = Field(0.0, description="entities scoring lower are left out of /tag answers unless the request sets min_score (0 to 1; a rule's entity scores 1)")
    tag_labels: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated labels /tag answers unless the request sets labels; empty = all")

    # entity rules (docs/rules.md)
    rules_max: int = Field(200_000, description="rules in one rule set")
    rules_max_patterns: int = Field(1000, description="token patterns in one rule set (they cost more per token than phrases)")
    rule_max_chars: int = Field(200, description="characters of a rule's phrase, or of its token pattern as JSON")
    rules_max_body_bytes: int = Field(64 * 1024 * 1024, description="request bodies under /admin/rules (imports, bulk replaces) may be this large; MAX_BODY_BYTES elsewhere")

    # retraining jobs (run by `ner worker`, never by the API)
    finetune: dict[str, Any] = Field(default_factory=dict, description='fine-tuning settings as JSON, e.g. {"epochs": 6, "l2_to_base": 0.01} (ml/finetune.py FinetuneConfig)')
    promote_min_gain: float = Field(0.005, description="held-out F1 a new version must gain over the active one to be activated")
    promote_max_label_drop: float = Field(0.02, description="held-out F1 any one label may lose for a new version to be activated")
    promote_min_label_support: int = Field(10, description="labels with fewer held-out entities are not checked by the per-label rule (too noisy)")
    retrain_every_corrections: int = Field(0, description="the trainer queues a job by itself after this many new corrections; 0 = only POST /admin/retrain")
    rehearsal_max_texts: int = Field(2000, description="stored, uncorrected texts a job reads: half probe the forgetting, half serve rehearsal / distillation when on")
    promote_min_unseen_gain: float = Field(0.0, description="F1 a new version must gain on held-out mentions whose text never occurs in the training corrections (unseen names)")
    promote_min_unseen_mentions: int = Field(20, description="fewer unseen held-out mentions than this: the unseen-name rule is not applied (too noisy)")
    promote_max_time_drop: float = Field(0.01, description="F1 a new version may lose on the newest corrections (the time split)")
    promote_min_probe_agreement: float = Field(0.9, description="share of the base model's confident predictions on stored uncorrected texts a new version must keep (the forgetting probe)")
    promote_max_dev_drop: float = Field(0.005, description="base-corpus dev F1 a new version may lose (measured only with BASE_CORPUS)")
    train_threads: int = Field(0, description="torch threads of a training job (ner worker); 0 = all the machine's cores")
    base_corpus: str | None = Field(None, description="a folder with the base model's corpus (train.txt, dev.txt) for the trainer: mixed into fine-tunes and its dev F1 checked by the gate; unset = none")
    job_heartbeat_s: float = Field(5.0, description="how often a running job records that its worker is alive")
    job_stale_s: float = Field(120.0, description="a running job whose heartbeat is older than this is taken again by another worker")
    job_max_attempts: int = Field(3, description="a job whose worker died this many times is failed")
    worker_poll_s: float = Field(5.0, description="how often an idle trainer looks for a job")

    @field_validator("api_keys", "extra_labels", "allowed_hosts", "tag_labels", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: list[str]) -> list[str]:
        from service.security import parse_key_entry

        for entry in keys:
            parse_key_entry(entry)  # raises naming the problem (unknown role, shorter than 16)
        return keys

    @field_validator("device")
    @classmethod
    def _device_spelled(cls, device: str) -> str:
        # the spelling only: whether CUDA works is checked where torch is loaded (ml.device)
        if re.fullmatch(r"cpu|cuda(:\d+)?", device) is None:
            raise ValueError(f"DEVICE must be cpu, cuda or cuda:N, not {device!r}")
        return device

    @field_validator("admin_key")
    @classmethod
    def _admin_key_long_enough(cls, key: str | None) -> str | None:
        if key is not None and len(key) < 16:
            raise ValueError("ADMIN_KEY must be at least 16 characters")
        return key

    @model_validator(mode="after")
    def _limits_positive(self) -> Settings:
        if self.inline_max_chars < 0:
            raise ValueError("INLINE_MAX_CHARS must be at least 0 (0 = never tag in the request's thread)")
        if not 0.01 <= self.gil_switch_ms <= 100:
            raise ValueError("GIL_SWITCH_MS must lie between 0.01 and 100")
        if self.train_threads < 0:
            raise ValueError("TRAIN_THREADS must be 0 (all cores) or positive")
        for name in ("max_body_bytes", "max_text_chars", "max_batch_texts", "batch_max_texts", "queue_max_texts", "torch_threads", "db_write_batch", "max_entities", "queue_max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be at least 1")
        if self.job_stale_s <= 2 * self.job_heartbeat_s:
            raise ValueError("JOB_STALE_S must be more than twice JOB_HEARTBEAT_S, or a live worker's job could be taken from it")
        if self.job_max_attempts < 1 or self.promote_min_label_support < 0 or self.retrain_every_corrections < 0:
            raise ValueError("JOB_MAX_ATTEMPTS must be at least 1; PROMOTE_MIN_LABEL_SUPPORT and RETRAIN_EVERY_CORRECTIONS non-negative")
        if self.queue_max_texts < self.max_batch_texts:
            raise ValueError("QUEUE_MAX_TEXTS must be at least MAX_BATCH_TEXTS, or a full request could never be queued")
        if self.queue_max_chars < self.max_text_chars:
            raise ValueError("QUEUE_MAX_CHARS must be at least MAX_TEXT_CHARS, or a text within the limit could never be queued")
        if self.retention_days is not None and self.retention_days <= 0:
            raise ValueError("RETENTION_DAYS must be positive (unset it to keep everything)")
        if self.idempotency_ttl_hours <= 0:
            raise ValueError("IDEMPOTENCY_TTL_HOURS must be positive")
        if self.body_timeout_s <= 0:
            raise ValueError("BODY_TIMEOUT_S must be positive")
        if not 0.0 <= self.tag_min_score <= 1.0:
            raise ValueError(f"TAG_MIN_SCORE must lie between 0 and 1, not {self.tag_min_score}")
        for name in ("rules_max", "rules_max_patterns", "rule_max_chars", "rules_max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be at least 1")
        return self

    @functools.cached_property
    def key_ring(self) -> KeyRing:
        from service.security import KeyRing

        return KeyRing.from_settings(self.api_keys, self.admin_key)
