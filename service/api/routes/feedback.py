"""POST /feedback: corrected entities for a stored prediction or for a new text."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse

from service.api.deps import RuntimeDep, SessionDep, require_annotate_key
from service.schemas import FeedbackRequest, FeedbackResponse
from service.store.tables import Annotation
from service.training.feedback import store_feedback

router = APIRouter(tags=["feedback"], dependencies=[Depends(require_annotate_key)])


@router.post("/feedback", status_code=201, response_model=FeedbackResponse, responses={200: {"model": FeedbackResponse, "description": "a replay of an earlier request with the same Idempotency-Key"}})
def feedback(
    body: FeedbackRequest,
    runtime: RuntimeDep,
    session: SessionDep,
    # an empty key is refused by store_feedback with its own code (invalid_idempotency_key); the
    # schema says so too, so that a generated client never sends one
    idempotency_key: Annotated[str | None, Header(max_length=200, json_schema_extra={"minLength": 1})] = None,
):
    result = store_feedback(session, body, idempotency_key=idempotency_key, model=runtime.tagging.model, settings=runtime.settings)
    return JSONResponse(_describe(result.annotation, result.replayed), status_code=200 if result.replayed else 201)


def _describe(annotation: Annotation, replayed: bool) -> dict:
    return FeedbackResponse(
        id=annotation.id, prediction_id=annotation.prediction_id, document_id=annotation.document_id,
        entities=annotation.entities, replayed=replayed,
    ).model_dump(mode="json")
