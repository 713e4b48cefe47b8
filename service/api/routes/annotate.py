"""GET /annotate: the annotation page (static files shipped in the package, no build step), and
GET /annotate/status: what the page needs besides the public endpoints (labels, progress)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from pydantic import BaseModel

from service.api.deps import RuntimeDep, SessionDep, require_api_key
from service.errors import ApiError
from service.schemas import ModelRef
from service.training.feedback import accepted_labels, annotation_progress

STATIC = Path(__file__).resolve().parents[2] / "static" / "annotate"
# the page's files and their types; nothing else under the folder is served
ASSETS = {"app.js": "text/javascript", "offsets.js": "text/javascript", "annotate.css": "text/css"}
# the page and its scripts change with the service version: browsers revalidate instead of guessing
NO_STALE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["annotation page"])


class AnnotateStatus(BaseModel):
    model: ModelRef
    labels: list[str]
    corrected_total: int
    queue_remaining: int


@router.get("/annotate", include_in_schema=False)
async def page() -> FileResponse:
    # the page itself holds no data: it asks for an API key when the endpoints it calls need one
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=NO_STALE)


@router.get("/annotate/static/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    media = ASSETS.get(name)
    if media is None:
        raise ApiError(404, "not_found", f"no such file of the annotation page: {name!r}")
    return FileResponse(STATIC / name, media_type=f"{media}; charset=utf-8", headers=NO_STALE)


@router.get("/annotate/status", response_model=AnnotateStatus, dependencies=[Depends(require_api_key)])
def status(runtime: RuntimeDep, session: SessionDep) -> AnnotateStatus:
    """The served model, the labels feedback accepts (the model's, then EXTRA_LABELS), how many texts
    have an accepted correction, and how many stored texts wait in the queue."""
    model = runtime.tagging.model
    corrected, queued = annotation_progress(session)
    return AnnotateStatus(
        model=ModelRef(name=model.name, version=model.version), labels=accepted_labels(model, runtime.settings),
        corrected_total=corrected, queue_remaining=queued,
    )
