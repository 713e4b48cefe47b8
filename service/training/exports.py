"""Stored corrections as training data, for GET /annotations and `ner train --annotations-from`."""
from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator

from sqlalchemy.orm import Session

from ml.data.conll import write_conll
from ml.data.jsonl import text_to_sentences
from service.store import repositories


def as_utc(since: dt.datetime | None) -> dt.datetime | None:
    """A time without a zone is UTC (the database stores UTC)."""
    if since is not None and since.tzinfo is None:
        return since.replace(tzinfo=dt.UTC)
    return since


def export_lines(session: Session, fmt: str, since: dt.datetime | None, language: str = "en") -> Iterator[str]:
    """One JSONL record, or one CoNLL document (IOB2, two columns), per accepted correction stored
    at or after ``since`` (UTC when it has no zone)."""
    for a in repositories.iter_annotations(session, since=as_utc(since)):
        text = a.document.text  # always kept for corrected texts (see repositories.create_annotation)
        if text is None:
            raise ValueError(f"annotation {a.id}: its document has no text, but a corrected text is always kept")
        entities = repositories.annotation_entities(a)
        if fmt == "jsonl":
            meta = {"author": a.author, "source": a.source, "created_at": a.created_at.isoformat(), "prediction_id": str(a.prediction_id) if a.prediction_id else None,
                    # the held-out split of `ner finetune` is by document
                    "document_id": str(a.document_id)}
            yield json.dumps({"id": a.id, "text": text, "entities": entities, "meta": meta}, ensure_ascii=False) + "\n"
        else:
            spans = [(e["start"], e["end"], e["label"]) for e in entities]
            # spans were token-aligned when accepted; only another tokenizer (a model of another
            # language since) could split them, and then they are widened to whole tokens
            sentences = text_to_sentences(text, spans, language, doc_id=a.id, allow_partial=True)
            out = io.StringIO()
            write_conll(sentences, out, scheme="iob2")
            yield out.getvalue()
