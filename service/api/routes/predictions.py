"""DELETE /predictions/{id}: erase what /tag stored, by the prediction id its answer gave."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from service.api.deps import SessionDep, require_api_key
from service.schemas import PredictionErased
from service.training.feedback import erase_prediction

router = APIRouter(tags=["predictions"], dependencies=[Depends(require_api_key)])


@router.delete("/predictions/{prediction_id}", response_model=PredictionErased)
def delete_prediction(prediction_id: uuid.UUID, session: SessionDep):
    """The prediction is deleted, and its stored text with it unless a correction refers to that
    text (a correction is training data: erase it with DELETE /documents?sha256=). A correction of
    this prediction stays, without the link."""
    removed = erase_prediction(session, prediction_id=prediction_id)
    return PredictionErased(prediction_id=prediction_id, deleted=removed.as_dict())
