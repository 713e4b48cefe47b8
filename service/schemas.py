"""Request and response bodies (apart from the ORM). Unknown fields are rejected."""
from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic.json_schema import JsonDict

if TYPE_CHECKING:
    from ml.pipeline import TextResult


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# what check_text accepts, for generated clients and schemathesis: at least one non-space character,
# no control characters but tab, CR and LF
_ALLOWED = "[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]"
TEXT_PATTERN = f"^{_ALLOWED}*[^\\s\\u0000-\\u001f\\u007f-\\u009f]{_ALLOWED}*$"
# (the length limits are settings, MAX_TEXT_CHARS and MAX_BATCH_TEXTS, answered with 413 / 422)
_TEXT_SCHEMA: JsonDict = {"type": "string", "minLength": 1, "pattern": TEXT_PATTERN}


class TagRequest(Strict):
    # exactly one of text / texts, said in the schema too (the validator below enforces it)
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [
            {"required": ["text"], "properties": {"text": _TEXT_SCHEMA, "texts": {"type": "null"}}},
            {"required": ["texts"], "properties": {"texts": {"type": "array", "minItems": 1, "items": _TEXT_SCHEMA}, "text": {"type": "null"}}},
        ],
    })

    text: StrictStr | None = Field(None, description="one text; answered with one result")
    texts: list[StrictStr] | None = Field(None, description="several texts; answered with {results: [...]}")
    include_tokens: StrictBool = False
    store: StrictBool = Field(True, description="false: tag without persisting")
    min_score: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="leave out entities scoring lower (default: TAG_MIN_SCORE); a rule's entity scores 1; stored predictions keep every entity",
    )
    labels: list[StrictStr] | None = Field(
        None, min_length=1, max_length=100,
        description="answer only entities of these labels (default: TAG_LABELS, else all); a label neither the model nor EXTRA_LABELS has is a 422",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> TagRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' and 'texts'")
        if self.texts is not None and not self.texts:
            raise ValueError("'texts' must not be empty")
        return self


class ModelRef(BaseModel):
    name: str
    version: str


class EntityOut(BaseModel):
    start: int
    end: int
    label: str
    text: str
    score: float = Field(description="the model's mean tag probability over the entity; 1 for an entity a rule made")
    source: Literal["model", "rule"] = Field(description="the model, or an entity rule (docs/rules.md)")
    rule_id: int | None = Field(description="the rule that made it (GET /admin/rules); null for the model's")


class TokenOut(BaseModel):
    text: str
    start: int
    end: int
    tag: str
    score: float


# the JSON of one tagged text; no docstring: it would become the schema's description in the
# public OpenAPI document. /tag builds it with text_result_json below, not through pydantic (that
# would cost every request a validation): keep the two together, tests/service/test_wire_shape.py
# checks that they agree.
class TextResultOut(BaseModel):
    id: uuid.UUID | None = Field(None, description="prediction id, for feedback; null when not stored")
    stored: bool
    model: ModelRef
    entities: list[EntityOut]
    tokens: list[TokenOut] | None = None


class TextResultsOut(BaseModel):
    results: list[TextResultOut]


def entities_json(result: TextResult) -> list[dict]:
    """``EntityOut`` of every entity of a tagged text (also what is stored with the prediction)."""
    return [
        {"start": e.start, "end": e.end, "label": e.label, "text": e.text, "score": round(e.score, 6), "source": e.source, "rule_id": e.rule_id}
        for e in result.entities
    ]


def text_result_json(prediction_id: uuid.UUID | None, model_name: str, model_version: str, entities: list[dict], tokens_of: TextResult | None) -> dict:
    """A ``TextResultOut`` as JSON: ``prediction_id`` None when not stored; ``tokens_of`` the
    tagged text whose tokens to include, None to leave them out."""
    result = {"id": str(prediction_id) if prediction_id is not None else None, "stored": prediction_id is not None,
              "model": {"name": model_name, "version": model_version}, "entities": entities}
    if tokens_of is not None:
        result["tokens"] = [{"text": k.text, "start": k.start, "end": k.end, "tag": k.tag, "score": round(k.score, 6)} for k in tokens_of.tokens]
    return result


def _whole_number(value: Any) -> Any:
    # JSON Schema's "integer" includes 3.0 (a number without a fraction), so the schema promises it is
    # accepted; StrictInt still refuses strings, booleans and 3.5
    return int(value) if isinstance(value, float) and value.is_integer() else value


# an integer in a JSON body, as JSON Schema means it (schemathesis sent 211660266597.0 and got 422)
WholeNumber = Annotated[StrictInt, BeforeValidator(_whole_number)]


class EntityIn(Strict):
    start: WholeNumber = Field(ge=0)
    end: WholeNumber = Field(ge=0)
    label: StrictStr = Field(min_length=1, max_length=50)
    text: StrictStr | None = Field(None, description="optional; must equal the text between start and end")
    score: float | None = Field(None, description="ignored; accepted so predicted entities can be sent back as they came")
    source: Literal["model", "rule"] | None = Field(None, description="ignored, as score")
    rule_id: WholeNumber | None = Field(None, description="ignored, as score")


class FeedbackRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "anyOf": [
            {"required": ["prediction_id"], "properties": {"prediction_id": {"type": "string", "format": "uuid"}}},
            {"required": ["text"], "properties": {"text": _TEXT_SCHEMA}},
        ],
    })

    prediction_id: uuid.UUID | None = None
    text: StrictStr | None = None
    entities: list[EntityIn]
    author: StrictStr | None = Field(None, max_length=200)
    allow_partial: StrictBool = Field(False, description="widen spans that split a token to whole tokens (if the server allows it)")

    @model_validator(mode="after")
    def _target(self) -> FeedbackRequest:
        if self.prediction_id is None and self.text is None:
            raise ValueError("give 'prediction_id' (to correct a prediction) or 'text' (to annotate a new text)")
        return self


class EntitySpan(BaseModel):
    start: int
    end: int
    label: str
    text: str


class FeedbackResponse(BaseModel):
    id: int
    prediction_id: uuid.UUID | None
    document_id: uuid.UUID
    entities: list[EntitySpan]
    replayed: bool = Field(description="true when an earlier request with the same Idempotency-Key stored it")


class ModelInfo(BaseModel):
    name: str
    version: str
    labels: list[str]
    language: str
    metrics: dict
    lineage: dict


class QueueItem(BaseModel):
    prediction_id: uuid.UUID
    text: str
    entities: list
    min_score: float
    model: ModelRef


class ModelVersionOut(BaseModel):
    id: int
    name: str
    version: str
    path: str
    active: bool
    metrics: dict
    lineage: dict
    promotion: dict | None = Field(None, description="for a version a training job made: the promotion gate's decision and reason")


class RegisterModel(Strict):
    path: StrictStr = Field(min_length=1, pattern=r"\S", description="model folder inside MODELS_DIR, as seen by the service")
    activate: StrictBool = True


class RetrainRequest(Strict):
    base_model_id: WholeNumber | None = Field(None, description="model version to fine-tune (default: the active one when the job runs)")
    finetune: dict = Field(default_factory=dict, description='fine-tuning settings for this job over FINETUNE, e.g. {"epochs": 4}')
    method: Literal["finetune", "retrain"] = Field("finetune", description="finetune: from the base model's weights; retrain: from scratch with its recipe on BASE_CORPUS plus the corrections (needs BASE_CORPUS)")


class JobOut(BaseModel):
    id: int
    status: str = Field(description="queued | running | succeeded | failed")
    trigger: str = Field(description="api (POST /admin/retrain) or schedule (RETRAIN_EVERY_CORRECTIONS)")
    params: dict
    base_model_id: int | None
    result_model_id: int | None
    corrections: int = Field(description="accepted corrections when the job was queued")
    worker: str | None
    attempts: int
    progress: float = Field(description="0 to 1")
    log_tail: list[str]
    metrics: dict
    decision: dict | None = Field(description="the promotion gate: promote, reason (every rule that refused), gain, worst label and its drop, checks (the measure behind each rule)")
    curve: list[dict] = Field(default_factory=list, description="gain per number of corrections: one point per succeeded job up to this one (held-out, unseen-name and newest-corrections F1 gains, probe agreement)")
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    finished_at: dt.datetime | None


class Erased(BaseModel):
    document_id: uuid.UUID
    deleted: dict[str, int] = Field(description="rows removed: documents, predictions, annotations")


class PredictionErased(BaseModel):
    prediction_id: uuid.UUID
    deleted: dict[str, int] = Field(description="rows removed: the prediction, its text (documents: 1) unless a correction refers to it, annotations: 0")
