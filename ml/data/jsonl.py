"""JSONL with character-offset spans, the shape the service takes as feedback and exports:
``{"text": "...", "entities": [{"start": 0, "end": 5, "label": "PER"}, ...]}`` one object a line.

Texts are tokenized and split into sentences by the same spaCy tokenizer the service uses; a
sentence boundary that would cut an entity is not used."""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from ml.data import DataFormatError, Sentence
from ml.data.tokenizer import AlignmentError, Token, char_spans_to_token_spans, get_tokenizer


def parse_record(record: object) -> tuple[str, list[tuple[int, int, str]]]:
    """Validate one JSON object; raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    unknown = set(record) - {"text", "entities", "id", "meta"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (expected text, entities, and optionally id, meta)")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string")
    entities = record.get("entities", [])
    if not isinstance(entities, list):
        raise ValueError("'entities' must be a list")
    spans = []
    for k, e in enumerate(entities):
        if not isinstance(e, dict) or set(e) - {"start", "end", "label", "text", "score"} or not {"start", "end", "label"} <= set(e):
            raise ValueError(f"entity {k} must be an object with start, end and label")
        start, end, label = e["start"], e["end"], e["label"]
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or isinstance(end, bool):
            raise ValueError(f"entity {k}: start and end must be integers")
        if not 0 <= start < end <= len(text):
            raise ValueError(f"entity {k}: [{start}, {end}) is not a non-empty range inside the text of {len(text)} characters")
        if not isinstance(label, str) or not label or "-" in label or label.strip() != label:
            raise ValueError(f"entity {k}: label {label!r} must be a non-empty string without '-' or surrounding spaces")
        spans.append((start, end, label))
    spans.sort()
    for a, b in itertools.pairwise(spans):
        if b[0] < a[1]:
            raise ValueError(f"entities [{a[0]}, {a[1]}) and [{b[0]}, {b[1]}) overlap")
    return text, spans


def text_to_sentences(
    text: str, entities: list[tuple[int, int, str]], language: str = "en", doc_id: int | None = None, allow_partial: bool = False
) -> list[Sentence]:
    """Tokenize, split into sentences (keeping entities whole), and align the character spans
    (widened to whole tokens with ``allow_partial``, else AlignmentError)."""
    groups: list[list[Token]] = []
    for sent in get_tokenizer(language).sentences(text):
        # an entity that started in the previous sentence and has not ended: join the two
        if groups and any(s < groups[-1][-1].end and e > sent[0].start for s, e, _ in entities):
            groups[-1].extend(sent)
        else:
            groups.append(list(sent))
    out = []
    for tokens in groups:
        lo, hi = tokens[0].start, tokens[-1].end
        inside = [e for e in entities if e[0] < hi and lo < e[1]]
        spans = char_spans_to_token_spans(tokens, inside, allow_partial)
        out.append(Sentence([t.text for t in tokens], spans, text=text, offsets=[(t.start, t.end) for t in tokens], doc_id=doc_id))
    return out


def read_jsonl(path: str | Path, language: str = "en") -> list[Sentence]:
    path = Path(path)
    sentences: list[Sentence] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text, entities = parse_record(json.loads(line))
                sentences.extend(text_to_sentences(text, entities, language, doc_id=number))
            except json.JSONDecodeError as e:
                raise DataFormatError(path, number, f"invalid JSON: {e.msg} at column {e.colno}") from None
            except (ValueError, AlignmentError) as e:
                raise DataFormatError(path, number, str(e)) from None
    if not sentences:
        raise DataFormatError(path, 1, "no records found")
    return sentences


def sentence_to_record(sentence: Sentence) -> dict:
    """A sentence as a JSONL record; tokens without recorded offsets are joined by single spaces."""
    if sentence.offsets is not None and sentence.text is not None:
        lo = sentence.offsets[0][0]
        text = sentence.text[lo : sentence.offsets[-1][1]]
        offsets = [(s - lo, e - lo) for s, e in sentence.offsets]
    else:
        text = " ".join(sentence.tokens)
        offsets, position = [], 0
        for tok in sentence.tokens:
            offsets.append((position, position + len(tok)))
            position += len(tok) + 1
    entities = [{"start": offsets[s.start][0], "end": offsets[s.end - 1][1], "label": s.label} for s in sentence.spans]
    return {"text": text, "entities": entities}


def write_jsonl(sentences: Iterable[Sentence], out: TextIO) -> None:
    for s in sentences:
        out.write(json.dumps(sentence_to_record(s), ensure_ascii=False) + "\n")
