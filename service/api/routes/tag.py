"""POST /tag: texts in, entities with character offsets out."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.api.deps import RuntimeDep, require_api_key
from service.schemas import TagRequest, TextResultOut, TextResultsOut
from service.serving.tagging import tag_texts

router = APIRouter(tags=["tagging"], dependencies=[Depends(require_api_key)])


@router.post("/tag", response_class=JSONResponse, responses={200: {"model": TextResultOut | TextResultsOut, "description": "one result for 'text', {results} for 'texts'"}})
async def tag(body: TagRequest, runtime: RuntimeDep) -> JSONResponse:
    one_text = body.text is not None
    texts: list[str] = [body.text] if body.text is not None else list(body.texts or [])
    results = await tag_texts(
        texts, one_text=one_text, store=body.store, include_tokens=body.include_tokens,
        engine=runtime.tagging, writer=runtime.writer, settings=runtime.settings, min_score=body.min_score, labels=body.labels,
    )
    return JSONResponse(results[0] if one_text else {"results": results})
