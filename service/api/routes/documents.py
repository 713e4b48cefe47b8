"""Erasure of stored texts: DELETE /documents/{id} (admin) erases a text by the id a /feedback
answer names; DELETE /documents?sha256= erases it for whoever holds the text (tag role)."""
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from service.api.deps import SessionDep, require_admin_key, require_api_key
from service.schemas import Erased
from service.training.feedback import erase_document, erase_text

router = APIRouter(tags=["documents"])

Sha256 = Annotated[str, Query(pattern="^[0-9a-fA-F]{64}$", description="SHA-256 of the text's UTF-8 bytes, hex (e.g. `sha256sum`, `hashlib.sha256(text.encode()).hexdigest()`)")]


@router.delete("/documents/{document_id}", response_model=Erased, dependencies=[Depends(require_admin_key)])
def delete_document(document_id: uuid.UUID, session: SessionDep):
    """Every stored copy of the document's text (same SHA-256), its predictions and its corrections
    are deleted; it is gone from /annotations and /annotations/queue. The document id is in a
    /feedback answer (`document_id`)."""
    removed = erase_document(session, document_id=document_id)
    return Erased(document_id=document_id, deleted=removed.as_dict())


@router.delete("/documents", status_code=204, response_class=Response, dependencies=[Depends(require_api_key)])
def delete_text(sha256: Sha256, session: SessionDep) -> Response:
    """Erase a text by its SHA-256: every stored copy of it (also copies kept as a hash only), their
    predictions and its corrections; it is gone from /annotations and /annotations/queue. 204
    whether or not anything was stored: the answer does not tell a key holder whether someone else
    sent that text."""
    erase_text(session, sha256=sha256)
    return Response(status_code=204)
