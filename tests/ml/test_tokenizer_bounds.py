"""The tokenizer's work per text is bounded: spaCy is quadratic in a run of prefix/suffix characters,
so long runs are cut and texts are tokenized in chunks; offsets stay exact."""
from __future__ import annotations

import itertools
import random

import pytest

from ml.data import tokenizer as tokenizer_module
from ml.data.tokenizer import CHUNK_CHARS, MAX_RUN, Tokenizer

HOSTILE = [
    "{" * 16_000,
    "\U0001f600" * 20_000,
    "(" * 8_000 + " Paris " + ")" * 8_000,
    "x" * 20_000,
    "Barack Obama visited Paris. " * 400,
    "https://example.org/" + "a/" * 5_000,
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer("en")


def _spy(tok, monkeypatch) -> list[str]:
    seen: list[str] = []
    make_doc = tok.nlp.make_doc

    def recording(text):
        seen.append(text)
        return make_doc(text)

    monkeypatch.setattr(tok.nlp, "make_doc", recording)
    return seen


@pytest.mark.parametrize("text", HOSTILE, ids=["braces", "emoji", "parens", "letters", "sentences", "url"])
def test_spacy_never_sees_a_long_run_or_a_long_chunk(tok, monkeypatch, text):
    seen = _spy(tok, monkeypatch)
    sentences = tok.sentences(text)
    assert sentences and seen
    for chunk in seen:
        assert max(len(run) for run in chunk.split()) <= MAX_RUN
        assert len(chunk) <= CHUNK_CHARS + MAX_RUN + 1


@pytest.mark.parametrize("text", HOSTILE, ids=["braces", "emoji", "parens", "letters", "sentences", "url"])
def test_offsets_stay_exact_on_hostile_texts(tok, text):
    tokens = [t for s in tok.sentences(text) for t in s]
    assert all(text[t.start : t.end] == t.text for t in tokens)
    assert all(a.end <= b.start for a, b in itertools.pairwise(tokens))
    # every non-space character is in exactly one token
    assert sum(len(t.text) for t in tokens) == sum(1 for ch in text if not ch.isspace())
    assert tokens == tok.tokenize(text)


def test_cut_and_chunked_tokens_equal_spacy_on_ordinary_text(tok):
    rng = random.Random(0)
    words = ["Obama", "visited", "Paris", ",", "(", "Berlin", ")", "the", "U.S.", "don't", "e-mail", "\U0001f600", "\n", "\t", "  "]
    text = " ".join(rng.choice(words) for _ in range(3_000)) + "."
    assert len(text) > 4 * CHUNK_CHARS
    expected = [(t.text, t.idx) for t in tok.nlp.make_doc(text) if not t.is_space]
    assert [(t.text, t.start) for t in tok.tokenize(text)] == expected


def test_a_run_longer_than_the_bound_is_cut_into_bounded_tokens(tok):
    text = "see " + "y" * (MAX_RUN * 2 + 7) + " now"
    tokens = tok.tokenize(text)
    assert [t.text for t in tokens] == ["see", "y" * MAX_RUN, "y" * MAX_RUN, "y" * 7, "now"]
    assert [t.start for t in tokens][1:4] == [4, 4 + MAX_RUN, 4 + 2 * MAX_RUN]


def test_long_text_sentences_match_whole_text_sentences(tok):
    text = "Barack Obama visited Paris. Angela Merkel met him in Berlin!  Then?\n" * 200
    doc = tok.nlp(text)
    expected = [[(t.text, t.idx) for t in s if not t.is_space] for s in doc.sents]
    assert [[(t.text, t.start) for t in s] for s in tok.sentences(text)] == [s for s in expected if s]
    assert tokenizer_module._chunks(text)[0] != text  # the text really was chunked
