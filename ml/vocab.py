"""Vocabularies (words, characters, tags) and the token features shared by training and serving.

``word_key`` and ``casing`` define the features; the TorchScript export (``ml.export``) computes the
same ones over UTF-8 bytes with Unicode tables generated from Python's own ``str`` methods.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1

# Casing classes (0 is padding; the small hand feature of Huang et al. / Lample et al.), numbered in
# ``casing_class``'s docstring: the numbers are literals because TorchScript cannot read module globals.
NUM_CASES = 8


def word_key(token: str) -> str:
    """The key a token is looked up by in the word vocabulary: each character lower-cased on its
    own (no context rules such as the Greek final sigma, so the TorchScript export can match it),
    digits mapped to 0."""
    out: list[str] = []
    for ch in token:
        out.append("0" if ch.isdigit() else ch.lower())
    return "".join(out)


def casing(token: str) -> int:
    digits = 0
    letters = 0
    uppers = 0
    for ch in token:
        if ch.isdigit():
            digits += 1
        elif ch.isalpha():
            letters += 1
            if ch.isupper():
                uppers += 1
    return casing_class(len(token), digits, letters, uppers, len(token) > 0 and token[0].isupper())


def casing_class(length: int, digits: int, letters: int, uppers: int, first_upper: bool) -> int:
    """1 lower, 2 UPPER, 3 Title, 4 MiXed, 5 numeric, 6 has a digit, 7 no letters or digits.
    Shared with the TorchScript export, which counts characters its own way (see ml.export)."""
    if length > 0 and digits == length:
        return 5
    if digits > 0:
        return 6
    if letters == 0:
        return 7
    if uppers == 0:
        return 1
    if uppers == letters:
        return 2
    if uppers == 1 and first_upper:
        return 3
    return 4


def fold_char(ch: str) -> str:
    """A character lower-cased, where that gives one character (else the character itself)."""
    low = ch.lower()
    return low if len(low) == 1 else ch


class Vocab:
    """A string <-> id table. With ``specials`` the first ids are padding and unknown.

    ``aliases`` map further strings to an item's id (``stoi`` only; ``itos`` and the length count
    items). With ``fold_case`` (a character table whose items are lower-case, ``model.char_fold_case``)
    every item's one-character upper and title case is an alias of it, so ``A`` reads as ``a``
    everywhere ids are looked up (training, the CPU path, the TorchScript export)."""

    def __init__(self, items: Sequence[str], specials: bool = True, fold_case: bool = False, aliases: dict[str, str] | None = None):
        self.specials = specials
        self.fold_case = fold_case
        self.itos: list[str] = ([PAD, UNK] if specials else []) + [s for s in items if s not in (PAD, UNK)]
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary items must be unique")
        self.aliases: dict[str, str] = {}
        if fold_case:
            for item in self.itos[2 if specials else 0 :]:
                for variant in (item.upper(), item.title()):
                    if len(variant) == 1 and variant != item and variant not in self.stoi:
                        self.aliases[variant] = item
        for alias, target in (aliases or {}).items():
            if alias in self.stoi:
                raise ValueError(f"vocabulary alias {alias!r} is also an item")
            if target not in self.stoi:
                raise ValueError(f"vocabulary alias {alias!r} points to {target!r}, which is not an item")
            self.aliases[alias] = target
        for alias, target in self.aliases.items():
            self.stoi[alias] = self.stoi[target]

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, item: str) -> bool:
        return item in self.stoi

    def index(self, item: str) -> int:
        if self.specials:
            return self.stoi.get(item, UNK_ID)
        try:
            return self.stoi[item]
        except KeyError:
            raise KeyError(f"{item!r} is not in the vocabulary ({len(self)} items)") from None

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int = 1, extra: Iterable[str] = (), fold_case: bool = False, aliases: dict[str, str] | None = None) -> Vocab:
        kept = [s for s, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
        seen = set(kept)
        for s in extra:
            if s not in seen:
                seen.add(s)
                kept.append(s)
        return cls(kept, fold_case=fold_case, aliases={a: t for a, t in (aliases or {}).items() if t in seen and a not in seen})

    def to_json(self) -> dict:
        data: dict = {"specials": self.specials, "items": self.itos[2:] if self.specials else self.itos}
        if self.fold_case or self.aliases:
            data["fold_case"], data["aliases"] = self.fold_case, self.aliases
        return data

    @classmethod
    def from_json(cls, data: dict) -> Vocab:
        return cls(data["items"], specials=data["specials"], fold_case=data.get("fold_case", False), aliases=data.get("aliases"))


class Vocabularies:
    """The three tables a model needs: word keys, characters, and tags (in the model's scheme)."""

    def __init__(self, words: Vocab, chars: Vocab, tags: Vocab):
        if tags.specials:
            raise ValueError("the tag vocabulary must not have padding/unknown entries")
        self.words, self.chars, self.tags = words, chars, tags

    def save(self, folder: Path) -> None:
        payload = {"words": self.words.to_json(), "chars": self.chars.to_json(), "tags": self.tags.to_json()}
        (Path(folder) / "vocab.json").write_text(json.dumps(payload, ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> Vocabularies:
        return cls.from_json(json.loads((Path(folder) / "vocab.json").read_text()))

    @classmethod
    def from_json(cls, data: dict) -> Vocabularies:
        return cls(Vocab.from_json(data["words"]), Vocab.from_json(data["chars"]), Vocab.from_json(data["tags"]))

    @classmethod
    def build(
        cls,
        sentences: Iterable[Sequence[str]],
        tags: Sequence[str],
        min_char_count: int = 1,
        extra_words: Iterable[str] | None = None,
        fold_char_case: bool = False,
    ) -> Vocabularies:
        """With ``fold_char_case`` the character table holds lower-case characters (``fold_char``)
        and reads any other case of them as them: the character encoder sees no case, the casing
        feature alone does."""
        words: Counter = Counter()
        chars: Counter = Counter()
        for tokens in sentences:
            for tok in tokens:
                words[word_key(tok)] += 1
                chars.update(tok)
        aliases: dict[str, str] = {}
        if fold_char_case:
            folded: Counter = Counter()
            for ch, n in chars.items():
                folded[fold_char(ch)] += n
                if fold_char(ch) != ch:
                    aliases[ch] = fold_char(ch)  # e.g. KELVIN SIGN -> k, which k's upper case (K) does not cover
            chars = folded
        return cls(
            Vocab.from_counts(words, extra=extra_words or ()),
            Vocab.from_counts(chars, min_count=min_char_count, fold_case=fold_char_case, aliases=aliases),
            Vocab(list(tags), specials=False),
        )
