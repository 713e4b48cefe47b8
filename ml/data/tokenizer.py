"""The one tokenizer of the project: spaCy's rule-based tokenizer for a language code (no model
download), with a sentencizer for long texts. Tokens keep their character offsets into the text."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

from ml.labels import Span


class Token(NamedTuple):
    text: str
    start: int  # character offset into the text as given
    end: int


class Tokenizer:
    def __init__(self, language: str = "en"):
        import spacy

        try:
            self.nlp = spacy.blank(language)
        except (ImportError, KeyError, ValueError) as e:  # an unknown code, or a language whose extra packages are missing
            raise ValueError(f"spaCy has no tokenizer for language code {language!r}: {e}") from None
        self.nlp.add_pipe("sentencizer")
        self.language = language

    def tokenize(self, text: str) -> list[Token]:
        """All non-space tokens of ``text``; whitespace runs are not tokens."""
        return [Token(t.text, t.idx, t.idx + len(t.text)) for t in self.nlp.make_doc(text) if not t.is_space]

    def sentences(self, text: str) -> list[list[Token]]:
        """Tokens split into sentences by the rule-based sentencizer; offsets refer to the whole text."""
        doc = self.nlp(text)
        out = []
        for sent in doc.sents:
            tokens = [Token(t.text, t.idx, t.idx + len(t.text)) for t in sent if not t.is_space]
            if tokens:
                out.append(tokens)
        return out

    def pipe_sentences(self, texts: Sequence[str]) -> list[list[list[Token]]]:
        out = []
        for doc in self.nlp.pipe(texts):
            sents = []
            for sent in doc.sents:
                tokens = [Token(t.text, t.idx, t.idx + len(t.text)) for t in sent if not t.is_space]
                if tokens:
                    sents.append(tokens)
            out.append(sents)
        return out


@functools.lru_cache(maxsize=8)
def get_tokenizer(language: str) -> Tokenizer:
    return Tokenizer(language)


class AlignmentError(ValueError):
    pass


def char_spans_to_token_spans(tokens: Sequence[Token], entities: Sequence[tuple[int, int, str]], allow_partial: bool = False) -> list[Span]:
    """Map character spans ``(start, end, label)`` to token spans.

    A span must start at a token's start and end at a token's end; with ``allow_partial`` it is
    widened to the tokens it touches instead. Raises AlignmentError naming the span otherwise.
    """
    starts = {t.start: i for i, t in enumerate(tokens)}
    ends = {t.end: i for i, t in enumerate(tokens)}
    spans = []
    for start, end, label in entities:
        if start in starts and end in ends and starts[start] <= ends[end]:
            spans.append(Span(starts[start], ends[end] + 1, label))
            continue
        touched = [i for i, t in enumerate(tokens) if t.start < end and start < t.end]
        if not touched:
            raise AlignmentError(f"entity [{start}, {end}) {label!r} covers no token")
        if not allow_partial:
            first, last = tokens[touched[0]], tokens[touched[-1]]
            raise AlignmentError(
                f"entity [{start}, {end}) {label!r} splits a token: the nearest token boundaries are [{first.start}, {last.end})"
            )
        spans.append(Span(touched[0], touched[-1] + 1, label))
    return spans
