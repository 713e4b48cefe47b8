"""Entity rules (a gazetteer) applied after the model, and the per-request entity filters.

A rule gives a label to a *phrase* or to a *token pattern*. Both match whole tokens as
``ml.data.tokenizer`` splits them: the phrase "Acme Corp." is the token sequence
``("Acme", "Corp.")`` and never matches inside "Acme Corp.s". A phrase is case-sensitive or not
(``str.casefold`` on both sides). A token pattern is a list of token conditions (see TOKEN_KEYS).

Phrases are looked up in dicts keyed on token tuples (one entry per phrase, and per first token
the phrase lengths that start with it), so the cost of a text grows with its tokens, not with the
number of rules. Token patterns are checked at the positions their first literal token admits.

Matches never overlap: the longest wins, then the leftmost, then an exact phrase over a
case-folded one over a token pattern, then the earlier rule. ``merge`` puts them together with the
model's entities: ``override`` replaces every model entity a rule match overlaps, ``fill`` keeps a
rule match only where it overlaps no model entity. A rule entity's score is RULE_SCORE.

Pure Python: no torch, no service code."""
from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

RULE_SCORE = 1.0  # the score of an entity a rule produced: a rule is certain by definition
MODES = ("override", "fill")
SOURCES = ("model", "rule")

# the conditions a token pattern element may state (all of them must hold), and "op"
TOKEN_KEYS = ("text", "lower", "in", "lower_in", "shape", "is_digit", "is_alpha", "is_upper", "is_title", "is_punct")
OPS = ("1", "?", "+", "*")  # once (default), optional, one or more, any number
MAX_MATCH_TOKENS = 64  # a token pattern's match is at most this long (a "+" cannot run over a whole text)


class RuleError(ValueError):
    """Bad rules; ``problems`` holds ``(line, message)`` for each bad one (line 1 = the first)."""

    def __init__(self, problems: Sequence[tuple[int, str]]):
        self.problems = list(problems)
        shown = "; ".join(f"line {n}: {m}" for n, m in self.problems[:20])
        more = f" (and {len(self.problems) - 20} more)" if len(self.problems) > 20 else ""
        super().__init__(f"{len(self.problems)} bad rule(s): {shown}{more}")


@dataclass(frozen=True)
class RuleLimits:
    max_rules: int = 200_000  # rules in one rule set
    max_chars: int = 200  # characters of a phrase, or of a token pattern's JSON
    max_tokens: int = 16  # elements of a token pattern
    max_patterns: int = 1_000  # token patterns in one rule set (they cost more per token than phrases)
    max_label_chars: int = 50


@dataclass(frozen=True)
class Rule:
    """One rule. ``id`` is the database's (or the line number for a rules file)."""

    label: str
    phrase: str | None = None
    pattern: tuple[Mapping[str, Any], ...] | None = None
    case_sensitive: bool = False
    id: int | None = None
    note: str | None = None
    author: str | None = None

    @property
    def kind(self) -> str:
        return "phrase" if self.phrase is not None else "pattern"

    def key(self) -> tuple:
        """Two rules with the same key in one set are duplicates."""
        if self.phrase is not None:
            text = " ".join(self.phrase.split())
            return ("phrase", text if self.case_sensitive else text.casefold())
        return ("pattern", json.dumps(self.pattern, sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "label": self.label}
        if self.phrase is not None:
            out["phrase"] = self.phrase
        else:
            out["pattern"] = [dict(e) for e in self.pattern or ()]
        out.update(case_sensitive=self.case_sensitive, note=self.note, author=self.author)
        return out


class Found(NamedTuple):
    """An entity over token indices (``end`` exclusive), from the model or from a rule."""

    start: int
    end: int
    label: str
    score: float
    source: str = "model"
    rule_id: int | None = None


# ----------------------------------------------------------------------------- parsing and checking


@dataclass(frozen=True)
class Unreadable:
    """A line of a rules file that could not be read as a rule at all (not JSON, a broken CSV row)."""

    reason: str


def _check_element(element: Any, i: int) -> str | None:
    if not isinstance(element, dict):
        return f"pattern element {i} must be an object like {{\"lower\": \"acme\"}}"
    unknown = sorted(set(element) - {*TOKEN_KEYS, "op"})
    if unknown:
        return f"pattern element {i} has unknown key {unknown[0]!r}; allowed: {', '.join((*TOKEN_KEYS, 'op'))}"
    op = element.get("op", "1")
    if op not in OPS:
        return f"pattern element {i}: op must be one of {', '.join(OPS)}, not {op!r}"
    for key, value in element.items():
        if key in ("text", "lower", "shape", "op"):
            if not isinstance(value, str) or not value.strip():
                return f"pattern element {i}: {key!r} must be a non-empty string"
        elif key in ("in", "lower_in"):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                return f"pattern element {i}: {key!r} must be a non-empty list of non-empty strings"
        elif not isinstance(value, bool):
            return f"pattern element {i}: {key!r} must be true or false"
    return None


def _check_pattern(pattern: Any, limits: RuleLimits) -> str | None:
    if not isinstance(pattern, list) or not pattern:
        return "'pattern' must be a non-empty list of token conditions"
    if len(pattern) > limits.max_tokens:
        return f"'pattern' has {len(pattern)} elements; the limit is {limits.max_tokens}"
    if len(json.dumps(pattern)) > limits.max_chars:
        return f"'pattern' is longer than {limits.max_chars} characters as JSON"
    for i, element in enumerate(pattern):
        problem = _check_element(element, i)
        if problem is not None:
            return problem
    if not any(set(e) - {"op"} and e.get("op", "1") in ("1", "+") for e in pattern):
        return "'pattern' needs at least one required element (op 1 or +) with a condition"
    return None


def parse_rule(obj: Any, labels: Iterable[str] | None = None, limits: RuleLimits = RuleLimits()) -> Rule:
    """Check one rule given as a dict (a JSONL line, a CSV row, a request body); raises ValueError
    naming what is wrong. ``labels``: the labels a rule may give (None = any)."""
    if isinstance(obj, Unreadable):
        raise ValueError(obj.reason)
    if not isinstance(obj, dict):
        raise ValueError("a rule must be an object with 'label' and 'phrase' or 'pattern'")
    unknown = sorted(set(obj) - {"id", "label", "phrase", "pattern", "case_sensitive", "note", "author"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    label = obj.get("label")
    if not isinstance(label, str) or not label.strip():
        raise ValueError("'label' is missing or empty")
    if len(label) > limits.max_label_chars:
        raise ValueError(f"'label' is longer than {limits.max_label_chars} characters")
    allowed = list(labels) if labels is not None else None
    if allowed is not None and label not in allowed:
        raise ValueError(f"unknown label {label!r}: the model produces {', '.join(allowed)} (more with EXTRA_LABELS)")
    phrase, pattern = obj.get("phrase"), obj.get("pattern")
    if (phrase is None) == (pattern is None):
        raise ValueError("give exactly one of 'phrase' and 'pattern'")
    if phrase is not None:
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError("'phrase' is empty or only whitespace")
        if len(phrase) > limits.max_chars:
            raise ValueError(f"'phrase' has {len(phrase)} characters; the limit is {limits.max_chars}")
    else:
        problem = _check_pattern(pattern, limits)
        if problem is not None:
            raise ValueError(problem)
    case = obj.get("case_sensitive", False)
    if not isinstance(case, bool):
        raise ValueError("'case_sensitive' must be true or false")
    note, author = obj.get("note"), obj.get("author")
    for name, value in (("note", note), ("author", author)):
        if value is not None and (not isinstance(value, str) or len(value) > 500):
            raise ValueError(f"'{name}' must be a string of at most 500 characters")
    rule_id = obj.get("id")
    if rule_id is not None and (not isinstance(rule_id, int) or isinstance(rule_id, bool)):
        raise ValueError("'id' must be an integer")
    frozen = tuple(dict(e) for e in pattern) if pattern is not None else None
    return Rule(label, phrase, frozen, case, rule_id, note, author)


def parse_rules(rows: Iterable[tuple[int, Any]], labels: Iterable[str] | None = None, limits: RuleLimits = RuleLimits()) -> list[Rule]:
    """Check numbered rows (``(line, dict)``) as one rule set; raises RuleError listing every bad
    line (unknown label, empty or over-long pattern, duplicate, too many rules), or returns them all."""
    allowed = list(labels) if labels is not None else None
    rules: list[Rule] = []
    problems: list[tuple[int, str]] = []
    seen: dict[tuple, int] = {}
    patterns = 0
    for line, obj in rows:
        try:
            rule = parse_rule(obj, allowed, limits)
        except ValueError as e:
            problems.append((line, str(e)))
            continue
        first = seen.setdefault(rule.key(), line)
        if first != line:
            problems.append((line, f"duplicate of the rule on line {first}"))
            continue
        patterns += rule.pattern is not None
        if patterns > limits.max_patterns and rule.pattern is not None:
            problems.append((line, f"more than {limits.max_patterns} token patterns in one rule set"))
            continue
        rules.append(rule if rule.id is not None else replace(rule, id=line))
    if len(rules) > limits.max_rules:
        problems.append((0, f"{len(rules)} rules; the limit is {limits.max_rules} in one rule set"))
    if problems:
        raise RuleError(problems)
    return rules


def read_jsonl(text: str) -> list[tuple[int, Any]]:
    """Numbered JSON objects of a JSONL text (blank lines skipped); a line that is not JSON
    comes back as Unreadable, which ``parse_rules`` reports with its number."""
    rows: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((number, Unreadable(f"not JSON: {e.msg}")))
    return rows


CSV_COLUMNS = ("id", "label", "phrase", "pattern", "case_sensitive", "note", "author")


def read_csv(text: str) -> list[tuple[int, Any]]:
    """Numbered rows of a CSV text with a header (columns: CSV_COLUMNS, ``label`` and one of
    ``phrase``/``pattern`` required; ``pattern`` holds JSON). Line 1 is the header."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if not header or "label" not in header or unknown:
        why = f"unknown column {unknown[0]!r}" if unknown else "a header with 'label' and 'phrase' or 'pattern' is needed"
        raise RuleError([(1, f"{why}; columns: {', '.join(CSV_COLUMNS)}")])
    rows: list[tuple[int, Any]] = []
    for row in reader:
        rows.append((reader.line_num, _csv_row(row)))
    return rows


def _csv_row(row: dict[str, Any]) -> Any:
    if None in row:
        return Unreadable("more fields than the header has")
    out: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
    if "id" in out:
        out["id"] = int(out["id"]) if str(out["id"]).isdigit() else out["id"]
    if "pattern" in out:
        try:
            out["pattern"] = json.loads(out["pattern"])
        except json.JSONDecodeError as e:
            return Unreadable(f"'pattern' is not JSON: {e.msg}")
    if "case_sensitive" in out:
        flag = str(out["case_sensitive"]).strip().lower()
        out["case_sensitive"] = {"true": True, "1": True, "false": False, "0": False}.get(flag, out["case_sensitive"])
    return out


def write_jsonl(rules: Iterable[Rule]) -> Iterator[str]:
    for rule in rules:
        yield json.dumps(rule.to_dict(), ensure_ascii=False) + "\n"


def write_csv(rules: Iterable[Rule]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rule in rules:
        d = rule.to_dict()
        pattern = json.dumps(d["pattern"], ensure_ascii=False) if "pattern" in d else ""
        writer.writerow([d["id"], d["label"], d.get("phrase", ""), pattern, str(d["case_sensitive"]).lower(), d["note"] or "", d["author"] or ""])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()


def read_rules_file(path: str, labels: Iterable[str] | None = None, limits: RuleLimits = RuleLimits()) -> list[Rule]:
    """A rules file: CSV when it ends in .csv, else JSONL. Raises RuleError naming the bad lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    rows = read_csv(text) if str(path).lower().endswith(".csv") else read_jsonl(text)
    return parse_rules(rows, labels, limits)


# ----------------------------------------------------------------------------- phrase tokenization


class PhraseTokenizer:
    """Splits phrases into tokens exactly as the service's tokenizer splits a text, fast enough for
    100,000 phrases: spaCy tokenizes each whitespace-separated chunk on its own, so a chunk is
    tokenized once and cached; a chunk that is one token by ``_one_token`` and no special case of
    the tokenizer ("cannot", "dont") is taken as it is without calling spaCy at all
    (tests/ml/test_rules.py checks this against the tokenizer)."""

    def __init__(self, tokenize: Callable[[str], Sequence[str]], special_cases: Iterable[str] = (), max_run: int = 50):
        self._tokenize = tokenize
        self._special = frozenset(special_cases)
        self._max_run = max_run
        self._cache: dict[str, tuple[str, ...]] = {}

    @classmethod
    def for_language(cls, language: str) -> PhraseTokenizer:
        from ml.data.tokenizer import MAX_RUN, get_tokenizer

        tokenizer = get_tokenizer(language)
        special = getattr(tokenizer.nlp.tokenizer, "rules", None) or {}  # spaCy's special cases ("cannot", "dont")
        return cls(lambda s: [t.text for t in tokenizer.tokenize(s)], special, MAX_RUN)

    def __call__(self, phrase: str) -> tuple[str, ...]:
        out: list[str] = []
        for chunk in phrase.split():
            if len(chunk) <= self._max_run and _one_token(chunk) and chunk not in self._special:
                out.append(chunk)
                continue
            tokens = self._cache.get(chunk)
            if tokens is None:
                tokens = self._cache[chunk] = tuple(self._tokenize(chunk))
            out.extend(tokens)
        return tuple(out)


def _one_token(chunk: str) -> bool:
    """Letters only, digits only, or ASCII letters and digits ending in a digit ("COVID19"): none of
    spaCy's prefix, suffix or infix rules applies (a unit suffix needs letters after a digit, "10km")."""
    return chunk.isalpha() or chunk.isdecimal() or (chunk.isascii() and chunk.isalnum() and chunk[-1].isdigit())


# ----------------------------------------------------------------------------- token patterns


def token_shape(text: str) -> str:
    """spaCy's word shape: X upper, x lower, d digit, other characters as they are; a run of one
    kind longer than four is cut to four ("Apple" -> "Xxxxx", "2024-05" -> "dddd-dd")."""
    out: list[str] = []
    last, run = "", 0
    for ch in text:
        kind = "X" if ch.isupper() else "x" if ch.isalpha() else "d" if ch.isdigit() else ch
        run = run + 1 if kind == last else 1
        last = kind
        if run <= 4:
            out.append(kind)
    return "".join(out)


def _is_punct(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


_FLAGS: dict[str, Callable[[str], bool]] = {"is_digit": str.isdigit, "is_alpha": str.isalpha, "is_upper": str.isupper, "is_title": str.istitle, "is_punct": _is_punct}


def _test(key: str, value: Any) -> Callable[[str, str], bool]:
    """A test of one token (its text, its casefolded text) for one condition of a pattern element."""
    if key == "text":
        return lambda t, f: t == value
    if key == "lower":
        folded = value.casefold()
        return lambda t, f: f == folded
    if key in ("in", "lower_in"):
        options = frozenset(value) if key == "in" else frozenset(x.casefold() for x in value)
        return (lambda t, f: t in options) if key == "in" else (lambda t, f: f in options)
    if key == "shape":
        return lambda t, f: token_shape(t) == value
    flag = _FLAGS[key]
    return lambda t, f: flag(t) == value


def _condition(element: Mapping[str, Any]) -> Callable[[str, str], bool]:
    """A test of one token for a pattern element: every condition holds."""
    tests = [_test(key, value) for key, value in element.items() if key != "op"]
    return lambda t, f: all(test(t, f) for test in tests)


@dataclass
class _Pattern:
    rule_index: int
    tests: list[Callable[[str, str], bool]]
    ops: list[str]

    def longest(self, texts: Sequence[str], folded: Sequence[str], start: int) -> int:
        """The length of the longest match starting at ``start`` (0 if none): the pattern's NFA
        (one state per element) run over the tokens."""
        n = len(self.ops)
        states = self._closure({0})
        best = 0
        for k in range(start, min(len(texts), start + MAX_MATCH_TOKENS)):
            following: set[int] = set()
            for s in states:
                if s < n and self.tests[s](texts[k], folded[k]):
                    following.add(s + 1)
                    if self.ops[s] in ("+", "*"):
                        following.add(s)
            states = self._closure(following)
            if not states:
                break
            if n in states:
                best = k + 1 - start
        return best

    def _closure(self, states: set[int]) -> set[int]:
        todo, out = list(states), set(states)
        while todo:
            s = todo.pop()
            if s < len(self.ops) and self.ops[s] in ("?", "*") and s + 1 not in out:
                out.add(s + 1)
                todo.append(s + 1)
        return out


# ----------------------------------------------------------------------------- the compiled rule set


class RuleSet:
    """Rules compiled for matching; immutable once built (a worker swaps the whole object).

    ``version`` is the database's rule set version (None for a file); ``mode`` is ``override`` or
    ``fill``."""

    def __init__(self, rules: Sequence[Rule], mode: str = "override", version: int | None = None, tokenize: Callable[[str], Sequence[str]] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown rule mode {mode!r}; expected one of {', '.join(MODES)}")
        self.rules = list(rules)
        self.mode = mode
        self.version = version
        tokenize = tokenize or PhraseTokenizer.for_language("en")
        # token tuple -> rule index, and first token -> the lengths of the phrases it starts (longest first)
        self._exact: dict[tuple[str, ...], int] = {}
        self._folded: dict[tuple[str, ...], int] = {}
        self._exact_lengths: dict[str, tuple[int, ...]] = {}
        self._folded_lengths: dict[str, tuple[int, ...]] = {}
        self._anchored_exact: dict[str, list[_Pattern]] = {}
        self._anchored_folded: dict[str, list[_Pattern]] = {}
        self._floating: list[_Pattern] = []
        # the first two tokens of every phrase of two or more: a longer phrase is looked up only where they occur
        self._exact_pairs: set[tuple[str, str]] = set()
        self._folded_pairs: set[tuple[str, str]] = set()
        lengths: tuple[dict[str, set[int]], dict[str, set[int]]] = ({}, {})
        for index, rule in enumerate(self.rules):
            if rule.phrase is not None:
                tokens = tuple(tokenize(rule.phrase))
                table, by_first, pairs = (self._exact, lengths[0], self._exact_pairs) if rule.case_sensitive else (self._folded, lengths[1], self._folded_pairs)
                if not rule.case_sensitive:
                    tokens = tuple(t.casefold() for t in tokens)
                if tokens and tokens not in table:  # a duplicate phrase: the first rule keeps it
                    table[tokens] = index
                    by_first.setdefault(tokens[0], set()).add(len(tokens))
                    if len(tokens) > 1:
                        pairs.add((tokens[0], tokens[1]))
            else:
                self._add_pattern(index, rule.pattern or ())
        self._exact_lengths = {k: tuple(sorted(v, reverse=True)) for k, v in lengths[0].items()}
        self._folded_lengths = {k: tuple(sorted(v, reverse=True)) for k, v in lengths[1].items()}

    def __len__(self) -> int:
        return len(self.rules)

    def _add_pattern(self, index: int, pattern: Sequence[Mapping[str, Any]]) -> None:
        compiled = _Pattern(index, [_condition(e) for e in pattern], [e.get("op", "1") for e in pattern])
        first = pattern[0]
        if first.get("op", "1") in ("1", "+"):
            if "text" in first or "in" in first:
                for key in [first["text"]] if "text" in first else first["in"]:
                    self._anchored_exact.setdefault(key, []).append(compiled)
                return
            if "lower" in first or "lower_in" in first:
                for key in [first["lower"]] if "lower" in first else first["lower_in"]:
                    self._anchored_folded.setdefault(key.casefold(), []).append(compiled)
                return
        self._floating.append(compiled)

    def match(self, tokens: Sequence[str]) -> list[Found]:
        """Rule entities over ``tokens`` (token strings), never overlapping, in token order."""
        if not self.rules or not tokens:
            return []
        folded = [t.casefold() for t in tokens] if (self._folded or self._anchored_folded or self._floating) else tokens
        candidates: list[tuple[int, int, int, int]] = []  # (start, end, priority, rule index)
        n = len(tokens)
        # phrases: only the lengths of the phrases that start with this token are looked up
        for priority, table, lengths, pairs, key in (
            (0, self._exact, self._exact_lengths, self._exact_pairs, tokens),
            (1, self._folded, self._folded_lengths, self._folded_pairs, folded),
        ):
            if not table:
                continue
            for i, first in enumerate(key):
                starting = lengths.get(first)
                if starting is None:
                    continue
                longer = i + 1 < n and (first, key[i + 1]) in pairs
                for length in starting:
                    if (length == 1 or longer) and i + length <= n:
                        index = table.get(tuple(key[i : i + length]))
                        if index is not None:
                            candidates.append((i, i + length, priority, index))
        if self._anchored_exact or self._anchored_folded or self._floating:
            for i in range(n):
                for p in (*self._anchored_exact.get(tokens[i], ()), *self._anchored_folded.get(folded[i], ()), *self._floating):
                    length = p.longest(tokens, folded, i)
                    if length:
                        candidates.append((i, i + length, 2, p.rule_index))
        return [Found(s, e, self.rules[r].label, RULE_SCORE, "rule", self.rules[r].id) for s, e, _, r in _non_overlapping(candidates)]


def _non_overlapping(candidates: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Longest first, then leftmost, then priority, then rule order; each kept unless it overlaps
    one already kept. Returned in token order."""
    taken = [False] * (max((e for _, e, _, _ in candidates), default=0))
    kept = []
    for c in sorted(candidates, key=lambda c: (c[0] - c[1], c[0], c[2], c[3])):
        if not any(taken[c[0] : c[1]]):
            taken[c[0] : c[1]] = [True] * (c[1] - c[0])
            kept.append(c)
    kept.sort()
    return kept


# ----------------------------------------------------------------------------- merging and filtering


@dataclass
class Merged:
    """The entities of one text after the rules, and what the rules did (for metrics)."""

    entities: list[Found]
    skipped: list[Found] = field(default_factory=list)  # rule matches left out (fill mode: the model found something there)
    replaced: list[Found] = field(default_factory=list)  # model entities a rule match replaced (override mode)


def merge(model: Sequence[Found], rules: Sequence[Found], mode: str) -> Merged:
    """Model entities and non-overlapping rule matches over the same tokens, put together by the
    rule set's mode: ``override`` drops every model entity a rule match overlaps; ``fill`` drops
    every rule match that overlaps a model entity. Returned in token order."""
    if mode not in MODES:
        raise ValueError(f"unknown rule mode {mode!r}; expected one of {', '.join(MODES)}")
    if not rules:
        return Merged(sorted(model))

    def overlaps(a: Found, others: Sequence[Found]) -> bool:
        return any(a.start < b.end and b.start < a.end for b in others)

    if mode == "override":
        replaced = [m for m in model if overlaps(m, rules)]
        kept = [m for m in model if m not in replaced]
        return Merged(sorted([*kept, *rules]), replaced=replaced)
    skipped = [r for r in rules if overlaps(r, model)]
    return Merged(sorted([*model, *(r for r in rules if r not in skipped)]), skipped=skipped)


@dataclass(frozen=True)
class EntityFilter:
    """What a request keeps: entities scoring at least ``min_score`` (a rule entity scores
    RULE_SCORE), of the ``labels`` named (None = all)."""

    min_score: float = 0.0
    labels: frozenset[str] | None = None

    @classmethod
    def of(cls, min_score: float | None, labels: Iterable[str] | None, known: Iterable[str] | None = None) -> EntityFilter:
        """Checked: ``min_score`` in [0, 1], every label in ``known`` (when given); raises ValueError naming the bad value."""
        score = 0.0 if min_score is None else float(min_score)
        if not 0.0 <= score <= 1.0:  # (also refuses NaN)
            raise ValueError(f"min_score must lie between 0 and 1, not {min_score}")
        chosen = None if labels is None else frozenset(labels)
        if chosen is not None and known is not None:
            allowed = list(known)
            unknown = sorted(chosen - set(allowed))
            if unknown:
                raise ValueError(f"unknown label {unknown[0]!r}: known labels are {', '.join(allowed)}")
        return cls(score, chosen)

    @property
    def active(self) -> bool:
        return self.min_score > 0.0 or self.labels is not None

    def keep(self, label: str, score: float) -> bool:
        return score >= self.min_score and (self.labels is None or label in self.labels)
