"""DELETE /documents/{id}: erase a stored text and everything derived from it."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from service.api.deps import RuntimeDep, require_admin_key
from service.db.retention import erase_document
from service.errors import ApiError
from service.schemas import Erased

router = APIRouter(tags=["documents"], dependencies=[Depends(require_admin_key)])


@router.delete("/documents/{document_id}", response_model=Erased)
async def delete_document(document_id: uuid.UUID, runtime: RuntimeDep):
    """Every stored copy of the document's text (same SHA-256), its predictions and its corrections
    are deleted; it is gone from /annotations and /annotations/queue. Find the document id in a
    /feedback answer (`document_id`)."""
    def erase():
        with runtime.sessions() as session:
            return erase_document(session, document_id=document_id)

    removed = await run_in_threadpool(erase)
    if removed is None:
        raise ApiError(404, "document_not_found", f"no stored document with id {document_id}")
    return Erased(document_id=document_id, deleted=removed.as_dict())
