"""The one tokenizer of the project: spaCy's rule-based tokenizer for a language code (no model
download), with a sentencizer for long texts. Tokens keep their character offsets into the text."""
from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from ml.labels import Span

# spaCy's tokenizer strips prefix and suffix characters off a run of non-space characters one at a
# time, slicing the rest of the run each time: quadratic in the run's length (16,000 "{" took 25 s,
# 100,000 emoji about 21 minutes). A run longer than MAX_RUN characters is tokenized in pieces of at
# most MAX_RUN (such a run ends up as tokens of at most MAX_RUN characters); the work per text is
# then linear in its length.
MAX_RUN = 50
# characters handed to spaCy's Cython tokenizer (which holds the GIL) in one call: between two calls
# other threads, the service's event loop among them, get the interpreter
CHUNK_CHARS = 1000
_LONG_RUN = re.compile(r"\S{" + str(MAX_RUN + 1) + ",}")


def _cut_long_runs(text: str) -> tuple[str, list[int]]:
    """``text`` with a space inserted every MAX_RUN characters inside longer non-space runs, and the
    positions of the inserted spaces in the returned string (sorted), to map offsets back."""
    if _LONG_RUN.search(text) is None:
        return text, []
    parts: list[str] = []
    inserted: list[int] = []
    length, last = 0, 0
    for m in _LONG_RUN.finditer(text):
        parts.append(text[last : m.start()])
        length += m.start() - last
        run = m.group()
        for k in range(0, len(run), MAX_RUN):
            if k:
                parts.append(" ")
                inserted.append(length)
                length += 1
            piece = run[k : k + MAX_RUN]
            parts.append(piece)
            length += len(piece)
        last = m.end()
    parts.append(text[last:])
    return "".join(parts), inserted


def _chunks(text: str) -> list[str]:
    """``text`` cut right after a whitespace character roughly every CHUNK_CHARS characters (spaCy
    tokenizes each whitespace-separated piece on its own, so the tokens are the same)."""
    out, start = [], 0
    while len(text) - start > CHUNK_CHARS:
        cut = max(text.rfind(" ", start, start + CHUNK_CHARS), text.rfind("\n", start, start + CHUNK_CHARS))
        if cut <= start:  # no space or newline in the window: cut at any whitespace after it
            m = re.compile(r"\s").search(text, start + CHUNK_CHARS)
            if m is None:
                break
            cut = m.start()
        out.append(text[start : cut + 1])
        start = cut + 1
    out.append(text[start:])
    return out


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

    def _chunk_docs(self, text: str, sentences: bool) -> Iterator[tuple[Any, int, list[int]]]:
        """spaCy Docs of ``text`` with long runs cut (MAX_RUN), one per chunk of about CHUNK_CHARS
        (no single call into spaCy, and none of its whole-text steps, holds the GIL for long); with
        each, the chunk's offset in the cut text and the positions of the inserted spaces."""
        cut, inserted = _cut_long_runs(text)
        base = 0
        for chunk in _chunks(cut):
            yield (self.nlp(chunk) if sentences else self.nlp.make_doc(chunk)), base, inserted
            base += len(chunk)

    @staticmethod
    def _tokens(tokens, base: int, inserted: list[int]) -> list[Token]:
        out = []
        for t in tokens:
            if t.is_space:
                continue
            idx = base + t.idx
            # an inserted space is never inside a token: shift back by the spaces inserted before it
            start = idx - bisect.bisect_left(inserted, idx) if inserted else idx
            out.append(Token(t.text, start, start + len(t.text)))
        return out

    def tokenize(self, text: str) -> list[Token]:
        """All non-space tokens of ``text``; whitespace runs are not tokens."""
        out: list[Token] = []
        for doc, base, inserted in self._chunk_docs(text, sentences=False):
            out.extend(self._tokens(doc, base, inserted))
        return out

    def sentences(self, text: str) -> list[list[Token]]:
        """Tokens split into sentences by the rule-based sentencizer; offsets refer to the whole text.
        A chunk's first sentence continues the previous chunk's last one unless that one ended with
        a sentence-final punctuation token (the sentencizer's own rule)."""
        sentencizer: Any = self.nlp.get_pipe("sentencizer")
        punct = sentencizer.punct_chars
        out: list[list[Token]] = []
        for doc, base, inserted in self._chunk_docs(text, sentences=True):
            continues = bool(out) and out[-1][-1].text not in punct
            for sent in doc.sents:
                tokens = self._tokens(sent, base, inserted)
                if not tokens:
                    continue
                if continues:
                    out[-1].extend(tokens)
                    continues = False
                else:
                    out.append(tokens)
        return out

    def pipe_sentences(self, texts: Sequence[str]) -> list[list[list[Token]]]:
        return [self.sentences(text) for text in texts]


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
