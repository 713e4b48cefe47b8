"""Stored corrections as training data, for GET /annotations and `ner train --annotations-from`."""
from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator

from ml.data.conll import write_conll
from ml.data.jsonl import text_to_sentences
from service.db import repositories


def export_lines(sessions, fmt: str, since: dt.datetime | None, language: str = "en") -> Iterator[str]:
    """One JSONL record, or one CoNLL document (IOB2, two columns), per accepted correction."""
    with sessions() as session:
        for a in repositories.iter_annotations(session, since=since):
            text = a.document.text  # always kept for corrected texts (see repositories.create_annotation)
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
