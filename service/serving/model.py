"""The served model: a model folder loaded, smoke-tested and described (name, version, labels)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ml.mapped import default_cache_dir, trim_heap
from ml.pipeline import TextResult, TextTagger
from ml.predictor import Predictor


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    path: Path
    labels: list[str]
    language: str
    metrics: dict
    lineage: dict
    tagger: TextTagger = field(repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> ServedModel:
        """Load and smoke-test a model folder; raises ModelLoadError, DeviceError (or another error)
        if unusable. On a CPU the predictor takes the fast path (ml.fast); on a GPU the scripted model.
        The word table is mapped from a cache file shared by the workers (ml.mapped; MODEL_CACHE_DIR)."""
        predictor = Predictor.load(path, device, mapped_cache=default_cache_dir())
        loaded = predictor.loaded
        assert loaded is not None
        tagger = TextTagger(predictor)
        tagger.tag(["Smoke test, please ignore."])  # fails here, not on a user's request
        trim_heap()
        return cls(loaded.meta.name, loaded.meta.version, Path(path).resolve(), predictor.labels, loaded.meta.language,
                   loaded.metrics, loaded.meta.lineage, tagger)

    def info(self) -> dict:
        return {"name": self.name, "version": self.version}


@dataclass
class ServedResult:
    """A TextResult and the model version that produced it."""

    result: TextResult
    model: ServedModel
