"""The peer service for ``benchmarks/load.py --compare``: a plain FastAPI + spaCy NER wrapper.

    python -m uvicorn benchmarks.spacy_service:create_app --factory --workers 2 --port 8732

What a user would otherwise deploy: ``POST /tag`` with ``{"text": ...}`` runs spaCy's tokenizer and
an NER of the stock ``spacy init config --pipeline ner --optimize efficiency`` architecture (the four
CoNLL labels, randomly initialised weights, which run at the speed of trained ones) and answers the
entities with character offsets. Nothing is stored. The handler is ``async`` and calls the pipeline
directly: no thread-pool hand-off, the fastest way to wrap a CPU-bound call in FastAPI at
concurrency 1 (and no slower under load: the work holds the GIL either way).
"""
from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

LABELS = ("PER", "LOC", "ORG", "MISC")


class TagIn(BaseModel):
    text: str


def spacy_peer():
    """A blank English pipeline with an untrained NER of spaCy's efficiency architecture."""
    import spacy
    from spacy.cli.init_config import init_config

    config = init_config(lang="en", pipeline=["ner"], optimize="efficiency", gpu=False)
    nlp = spacy.util.load_model_from_config(config, auto_fill=True, validate=True)
    ner = nlp.get_pipe("ner")
    for label in LABELS:
        ner.add_label(label)  # type: ignore[attr-defined]
    nlp.initialize()
    return nlp


def create_app() -> FastAPI:
    app = FastAPI(title="spaCy NER wrapper (benchmark peer)")
    nlp = spacy_peer()

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/tag")
    async def tag(body: TagIn) -> dict:
        doc = nlp(body.text)
        return {"entities": [{"start": e.start_char, "end": e.end_char, "label": e.label_, "text": e.text} for e in doc.ents]}

    return app
