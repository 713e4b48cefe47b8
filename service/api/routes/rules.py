"""/admin/rules: the entity rules (gazetteer) applied after the model. Every change stores a new
version (who, when, what) and this worker serves it at once; the others within MODEL_POLL_S."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from ml.rules import OPS, TOKEN_KEYS, RuleError, read_csv, read_jsonl, write_csv, write_jsonl
from service.api.deps import RuntimeDep, SessionDep, require_admin_key
from service.errors import ApiError
from service.schemas import WholeNumber
from service.serving import rules as service_rules
from service.serving.rules import RuleChange
from service.store.tables import RuleSetVersion

Mode = Literal["override", "fill"]
_PATTERN_HELP = f"token pattern: a list of conditions, each with any of {', '.join(TOKEN_KEYS)} and op ({', '.join(OPS)})"


class RuleIn(BaseModel):
    # types only: the content (empty, too long, unknown label, duplicates) is checked by ml.rules,
    # which names each bad rule by its index
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["phrase"]}, {"required": ["pattern"]}]})

    label: StrictStr = Field(description="one of the model's labels or EXTRA_LABELS")
    phrase: StrictStr | None = Field(None, description="matched as whole tokens, as the service's tokenizer splits them")
    pattern: list[dict[str, Any]] | None = Field(None, description=_PATTERN_HELP)
    case_sensitive: StrictBool = False
    note: StrictStr | None = None
    author: StrictStr | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Who(BaseModel):
    model_config = ConfigDict(extra="forbid")

    author: StrictStr | None = Field(None, max_length=200, description="who makes the change (kept with the version)")
    note: StrictStr | None = Field(None, max_length=500, description="why (kept with the version)")


class AddRules(Who):
    rules: list[RuleIn] = Field(min_length=1)


class ReplaceRules(Who):
    rules: list[RuleIn]
    mode: Mode | None = Field(None, description="default: the current version's")


class RemoveRules(Who):
    ids: list[WholeNumber] = Field(min_length=1, max_length=10_000)


class SetMode(Who):
    mode: Mode


class DryRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    add: list[RuleIn] = Field(default_factory=list)
    remove: list[WholeNumber] = Field(default_factory=list, max_length=10_000)
    replace: StrictBool = Field(False, description="true: the rules of `add` replace the whole set")
    mode: Mode | None = None
    sample: int = Field(50, ge=1, le=500, description="stored texts to tag (the most recent)")


class RuleOut(BaseModel):
    id: int
    label: str
    phrase: str | None = None
    pattern: list[dict[str, Any]] | None = None
    case_sensitive: bool
    note: str | None
    author: str | None


class RuleSetOut(BaseModel):
    version: int
    parent: int = Field(description="the version it was made from (0: none)")
    mode: str = Field(description="override: a rule match replaces overlapping model entities; fill: only where the model found nothing")
    action: str = Field(description="add | remove | replace | import | mode | rollback")
    rule_count: int
    author: str | None
    note: str | None
    created_at: dt.datetime


class RuleListOut(BaseModel):
    version: int | None = Field(description="the newest version (served by every worker within MODEL_POLL_S); null: no rules yet")
    mode: str
    total: int = Field(description="rules matching the filters")
    rules: list[RuleOut]


class ChangedEntity(BaseModel):
    start: int
    end: int
    label: str
    text: str
    source: str
    rule_id: int | None


class ChangedText(BaseModel):
    text: str
    added: list[ChangedEntity]
    removed: list[ChangedEntity]


class DryRunOut(BaseModel):
    current_version: int | None
    rules_after: int
    mode_after: str
    sampled: int = Field(description="stored texts tagged")
    changed: int = Field(description="texts whose entities would change")
    texts: list[ChangedText]


def _out(row: RuleSetVersion) -> RuleSetOut:
    created = row.created_at if row.created_at.tzinfo is not None else row.created_at.replace(tzinfo=dt.UTC)  # SQLite drops the zone
    return RuleSetOut(version=row.id, parent=row.parent, mode=row.mode, action=row.action, rule_count=row.rule_count, author=row.author, note=row.note, created_at=created)


Version = Annotated[int, Path(ge=1, le=2**31 - 1, description="a version from GET /admin/rules/versions")]

router = APIRouter(prefix="/admin/rules", tags=["rules"], dependencies=[Depends(require_admin_key)])


@router.get("", response_model=RuleListOut)
def list_rules(
    session: SessionDep,
    label: Annotated[str | None, Query(max_length=50, description="only rules of this label")] = None,
    q: Annotated[str | None, Query(max_length=200, description="only phrases containing this (case-insensitive)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
):
    """The rules of the newest version."""
    row, rules = service_rules.current_rules(session)
    if label is not None:
        rules = [r for r in rules if r.label == label]
    if q is not None:
        needle = q.casefold()
        rules = [r for r in rules if r.phrase is not None and needle in r.phrase.casefold()]
    page = [RuleOut(**r.to_dict()) for r in rules[offset : offset + limit]]
    return RuleListOut(version=row.id if row else None, mode=row.mode if row else service_rules.DEFAULT_MODE, total=len(rules), rules=page)


@router.post("", response_model=RuleSetOut, status_code=201)
async def add_rules(body: AddRules, runtime: RuntimeDep, session: SessionDep):
    """Add rules: a new version with the current rules and these (none is stored if one is bad)."""
    change = RuleChange("add", add=[r.as_dict() for r in body.rules], author=body.author, note=body.note)
    return _out(await service_rules.change_rules(session, runtime.tagging, change))


@router.put("", response_model=RuleSetOut, status_code=201)
async def replace_rules(body: ReplaceRules, runtime: RuntimeDep, session: SessionDep):
    """Replace the whole rule set (an empty list removes every rule)."""
    change = RuleChange("replace", add=[r.as_dict() for r in body.rules], replace=True, mode=body.mode, author=body.author, note=body.note)
    return _out(await service_rules.change_rules(session, runtime.tagging, change))


@router.post("/remove", response_model=RuleSetOut, status_code=201)
async def remove_rules(body: RemoveRules, runtime: RuntimeDep, session: SessionDep):
    """Remove rules by id (404 naming the ids the current version does not have)."""
    change = RuleChange("remove", remove=list(body.ids), author=body.author, note=body.note)
    return _out(await service_rules.change_rules(session, runtime.tagging, change))


@router.delete("/{rule_id}", response_model=RuleSetOut)
async def remove_rule(rule_id: Annotated[int, Path(ge=1, le=2**31 - 1)], runtime: RuntimeDep, session: SessionDep, author: Annotated[str | None, Query(max_length=200)] = None):
    """Remove one rule (a new version without it)."""
    change = RuleChange("remove", remove=[rule_id], author=author)
    return _out(await service_rules.change_rules(session, runtime.tagging, change))


@router.put("/mode", response_model=RuleSetOut, status_code=201)
async def set_mode(body: SetMode, runtime: RuntimeDep, session: SessionDep):
    """Change how rules meet the model: override or fill (a new version with the same rules)."""
    change = RuleChange("mode", mode=body.mode, author=body.author, note=body.note)
    return _out(await service_rules.change_rules(session, runtime.tagging, change))


_IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}, "example": '{"phrase": "Acme Corp.", "label": "ORG"}\n'},
            "text/csv": {"schema": {"type": "string"}, "example": "label,phrase,pattern,case_sensitive,note,author\nORG,Acme Corp.,,false,,\n"},
        },
    }
}


@router.post("/import", response_model=RuleSetOut, status_code=201, openapi_extra=_IMPORT_BODY)
async def import_rules(
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    format: Annotated[Literal["jsonl", "csv"] | None, Query(description="default: csv for a text/csv body, else jsonl")] = None,
    replace: Annotated[bool, Query(description="true: the file replaces the whole rule set; false: its rules are added")] = False,
    mode: Annotated[Mode | None, Query()] = None,
    author: Annotated[str | None, Query(max_length=200)] = None,
    note: Annotated[str | None, Query(max_length=500)] = None,
):
    """Import a JSONL or CSV file (the format GET /admin/rules/export writes). Every bad line is
    reported with its number in ``details`` and nothing of a failed import is stored."""
    try:
        text = (await request.body()).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(422, "invalid_rules", f"the body is not UTF-8 (byte {e.start})") from None
    csv_body = format == "csv" or (format is None and request.headers.get("content-type", "").startswith("text/csv"))
    try:
        rows = read_csv(text) if csv_body else read_jsonl(text)
    except RuleError as e:
        raise service_rules.refuse(e.problems, by_line=True) from None
    change = RuleChange("import", add=[obj for _, obj in rows], lines=[n for n, _ in rows], replace=replace, mode=mode, author=author, note=note)
    return _out(await service_rules.change_rules(session, runtime.tagging, change))


@router.get("/export", response_class=StreamingResponse, responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}})
def export_rules(
    session: SessionDep,
    format: Annotated[Literal["jsonl", "csv"], Query()] = "jsonl",
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="default: the newest")] = None,
):
    """The rules of a version as JSONL or CSV (what POST /admin/rules/import reads)."""
    version, rules = service_rules.version_rules(session, version)
    media = "text/csv" if format == "csv" else "application/x-ndjson"
    lines = write_csv(rules) if format == "csv" else write_jsonl(rules)
    name = f"rules-v{version or 0}.{format}"
    return StreamingResponse(lines, media_type=f"{media}; charset=utf-8", headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/versions", response_model=list[RuleSetOut])
def list_versions(session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100):
    """Rule set versions, newest first: who changed what, and when."""
    return [_out(r) for r in service_rules.list_versions(session, limit)]


@router.post("/versions/{version}/rollback", response_model=RuleSetOut, status_code=201)
async def rollback(version: Version, runtime: RuntimeDep, session: SessionDep, body: Who | None = None):
    """Serve the rules of an earlier version again, as a new version (the history is kept)."""
    who = body or Who()
    change = RuleChange("rollback", rollback_to=version, author=who.author, note=who.note or f"rollback to version {version}")
    return _out(await service_rules.change_rules(session, runtime.tagging, change))


@router.post("/dry-run", response_model=DryRunOut)
async def dry_run(body: DryRun, runtime: RuntimeDep, session: SessionDep):
    """Tag a sample of stored texts with the current rules and with the rules this change would
    make; answer the texts whose entities would change. Nothing is stored."""
    action = "replace" if body.replace else "add"
    change = RuleChange(action, add=[r.as_dict() for r in body.add], remove=list(body.remove), replace=body.replace, mode=body.mode)
    return await service_rules.dry_run(session, runtime.tagging, change, body.sample)
