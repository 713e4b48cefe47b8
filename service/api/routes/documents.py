"""DELETE /documents/{id}: erase a stored text and everything derived from it."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from service.api.deps import SessionDep, require_admin_key
from service.schemas import Erased
from service.training.feedback import erase_document

router = APIRouter(tags=["documents"], dependencies=[Depends(require_admin_key)])


@router.delete("/documents/{document_id}", response_model=Erased)
def delete_document(document_id: uuid.UUID, session: SessionDep):
    """Every stored copy of the document's text (same SHA-256), its predictions and its corrections
    are deleted; it is gone from /annotations and /annotations/queue. The document id is in a
    /feedback answer (`document_id`)."""
    removed = erase_document(session, document_id=document_id)
    return Erased(document_id=document_id, deleted=removed.as_dict())
