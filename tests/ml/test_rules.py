"""Entity rules (ml.rules): token-aligned phrases and token patterns, overlaps between rules and
with the model in both modes, checks of bad rules with their line numbers, and the entity filter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml.data.tokenizer import get_tokenizer
from ml.rules import (
    RULE_SCORE,
    EntityFilter,
    Found,
    PhraseTokenizer,
    Rule,
    RuleError,
    RuleLimits,
    RuleSet,
    merge,
    parse_rules,
    read_csv,
    read_jsonl,
    read_rules_file,
    token_shape,
    write_csv,
    write_jsonl,
)

LABELS = ["PER", "ORG", "LOC", "MISC", "PRODUCT"]


@pytest.fixture(scope="module")
def tokenize():
    return PhraseTokenizer.for_language("en")


def words(text: str) -> list[str]:
    return [t.text for t in get_tokenizer("en").tokenize(text)]


def spans(found: list[Found]) -> list[tuple[int, int, str, str]]:
    return [(f.start, f.end, f.label, f.source) for f in found]


def test_phrase_tokenizer_splits_as_the_service_tokenizer(tokenize):
    phrases = [
        "Acme Corp.", "Pro-Max 3000", "don't stop", "cannot", "Im", "10km run", "U.S.", "New York City", "O'Neil",
        "e-mail", "Straße", "東京", "$100", "(beta)", "Dr. Who", "x" * 70, "Zürich", "AT&T", "café au lait", "3.14",
        "COVID19", "A4", "x86", "2x4", "10kg", "5G", "Company12345", "H2O", "1st", "Ⅻ", "٣٤", "³",
    ]
    for phrase in phrases:
        assert list(tokenize(phrase)) == words(phrase), phrase


def test_phrase_matches_whole_tokens_only(tokenize):
    rules = RuleSet([Rule("ORG", "Acme", id=1)], tokenize=tokenize)
    assert spans(rules.match(words("Acme bought Acmes and AcmeCorp"))) == [(0, 1, "ORG", "rule")]
    assert words("Acme-Corp") == ["Acme", "-", "Corp"]  # a hyphen splits: "Acme" is a token there
    assert spans(rules.match(words("Acme-Corp"))) == [(0, 1, "ORG", "rule")]


def test_case_insensitive_and_case_sensitive_phrases(tokenize):
    rules = RuleSet([Rule("ORG", "apple", case_sensitive=True, id=1), Rule("PRODUCT", "iPhone", id=2)], tokenize=tokenize)
    found = rules.match(words("Apple sold an apple and an IPHONE"))
    assert [(f.start, f.label, f.rule_id) for f in found] == [(3, "ORG", 1), (6, "PRODUCT", 2)]


def test_unicode_casefolding(tokenize):
    rules = RuleSet([Rule("LOC", "STRASSE", id=1), Rule("LOC", "zürich", id=2)], tokenize=tokenize)
    found = rules.match(words("Die Straße in ZÜRICH"))
    assert [(f.start, f.rule_id) for f in found] == [(1, 1), (3, 2)]


def test_longest_match_wins_then_exact_over_folded(tokenize):
    rules = RuleSet(
        [Rule("LOC", "New York", id=1), Rule("ORG", "New York Times", id=2), Rule("MISC", "new york times", id=3), Rule("ORG", "New York Times", case_sensitive=True, id=4)],
        tokenize=tokenize,
    )
    found = rules.match(words("the New York Times in New York"))
    assert [(f.start, f.end, f.rule_id) for f in found] == [(1, 4, 4), (5, 7, 1)]


def test_overlapping_rules_never_overlap_in_the_result(tokenize):
    rules = RuleSet([Rule("ORG", "Bank of", id=1), Rule("LOC", "of America", id=2), Rule("ORG", "Bank of America Plaza", id=3)], tokenize=tokenize)
    assert spans(rules.match(words("Bank of America"))) == [(0, 2, "ORG", "rule")]  # same length: the leftmost
    assert [f.rule_id for f in rules.match(words("Bank of America Plaza"))] == [3]


def test_token_pattern(tokenize):
    pattern = ({"lower": "project"}, {"shape": "dddd"}, {"is_upper": True, "op": "?"})
    rules = RuleSet([Rule("MISC", pattern=pattern, id=7)], tokenize=tokenize)
    found = rules.match(words("Project 2024 and project 1234 ALPHA, not project x1"))
    assert [(f.start, f.end, f.rule_id) for f in found] == [(0, 2, 7), (3, 6, 7)]


def test_token_pattern_plus_and_floating_start(tokenize):
    rules = RuleSet([Rule("PER", pattern=({"is_title": True, "op": "+"}, {"text": "Jr."}), id=1)], tokenize=tokenize)
    assert spans(rules.match(words("met John Paul Smith Jr. today"))) == [(1, 5, "PER", "rule")]
    assert rules.match(words("met Jr. today")) == []


def test_token_shape():
    assert token_shape("Apple") == "Xxxxx"
    assert token_shape("2024-05") == "dddd-dd"
    assert token_shape("Appleseed") == "Xxxxx"  # a run is cut to four


def test_merge_override_replaces_overlapping_model_entities():
    model = [Found(0, 2, "PER", 0.6), Found(3, 4, "LOC", 0.9), Found(6, 7, "ORG", 0.8)]
    rules = [Found(1, 4, "ORG", RULE_SCORE, "rule", 5)]
    merged = merge(model, rules, "override")
    assert spans(merged.entities) == [(1, 4, "ORG", "rule"), (6, 7, "ORG", "model")]
    assert [m.label for m in merged.replaced] == ["PER", "LOC"]


def test_merge_fill_only_where_the_model_found_nothing():
    model = [Found(0, 2, "PER", 0.6)]
    rules = [Found(1, 3, "ORG", RULE_SCORE, "rule", 1), Found(4, 5, "LOC", RULE_SCORE, "rule", 2)]
    merged = merge(model, rules, "fill")
    assert spans(merged.entities) == [(0, 2, "PER", "model"), (4, 5, "LOC", "rule")]
    assert [s.rule_id for s in merged.skipped] == [1]


def test_merge_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="unknown rule mode 'replace'"):
        merge([], [Found(0, 1, "X", 1.0, "rule", 1)], "replace")


def test_parse_reports_every_bad_line_with_its_number():
    text = "\n".join([
        json.dumps({"phrase": "Acme", "label": "ORG"}),
        json.dumps({"phrase": "   ", "label": "ORG"}),
        json.dumps({"phrase": "Foo", "label": "FOOD"}),
        json.dumps({"phrase": "x" * 201, "label": "ORG"}),
        "{not json",
        json.dumps({"phrase": "ACME", "label": "PER"}),
        json.dumps({"pattern": [{"color": "red"}], "label": "ORG"}),
        json.dumps({"phrase": "a", "pattern": [{"text": "a"}], "label": "ORG"}),
        "",
        json.dumps({"phrase": "ok", "label": "ORG", "case_sensitive": "yes"}),
    ])
    with pytest.raises(RuleError) as info:
        parse_rules(read_jsonl(text), LABELS)
    problems = dict(info.value.problems)
    assert sorted(problems) == [2, 3, 4, 5, 6, 7, 8, 10]
    assert "empty or only whitespace" in problems[2]
    assert "unknown label 'FOOD'" in problems[3]
    assert "201 characters; the limit is 200" in problems[4]
    assert "JSON" in problems[5]
    assert "duplicate of the rule on line 1" in problems[6]
    assert "unknown key 'color'" in problems[7]
    assert "exactly one of 'phrase' and 'pattern'" in problems[8]
    assert "true or false" in problems[10]


def test_parse_limits_the_number_of_rules():
    rows = [(n, {"phrase": f"name {n}", "label": "ORG"}) for n in range(1, 6)]
    with pytest.raises(RuleError, match="5 rules; the limit is 4"):
        parse_rules(rows, LABELS, RuleLimits(max_rules=4))
    patterns = [(n, {"pattern": [{"text": f"t{n}"}], "label": "ORG"}) for n in range(1, 4)]
    with pytest.raises(RuleError) as info:
        parse_rules(patterns, LABELS, RuleLimits(max_patterns=2))
    assert info.value.problems == [(3, "more than 2 token patterns in one rule set")]


def test_a_pattern_needs_a_required_condition():
    with pytest.raises(RuleError, match="at least one required element"):
        parse_rules([(1, {"pattern": [{"op": "*"}, {"is_digit": True, "op": "?"}], "label": "ORG"})], LABELS)


def test_jsonl_and_csv_round_trip(tmp_path: Path):
    rules = [Rule("ORG", "Acme, Inc.", id=3, note='say "hi"', author="ann"), Rule("MISC", pattern=({"lower": "v"}, {"is_digit": True}), case_sensitive=True, id=4)]
    from_jsonl = parse_rules(read_jsonl("".join(write_jsonl(rules))), LABELS)
    from_csv = parse_rules(read_csv("".join(write_csv(rules))), LABELS)
    assert from_jsonl == rules
    assert from_csv == rules
    path = tmp_path / "rules.csv"
    path.write_text("".join(write_csv(rules)), encoding="utf-8")
    assert read_rules_file(str(path), LABELS) == rules


def test_csv_needs_a_known_header():
    with pytest.raises(RuleError, match="unknown column 'colour'"):
        read_csv("label,phrase,colour\nORG,Acme,red\n")


def test_rules_without_ids_get_their_line_number():
    rules = parse_rules(read_jsonl('\n{"phrase": "Acme", "label": "ORG"}\n'), LABELS)
    assert rules[0].id == 2


def test_entity_filter():
    keep = EntityFilter.of(0.5, ["PER"], LABELS)
    assert keep.keep("PER", 0.5) and not keep.keep("PER", 0.49) and not keep.keep("ORG", 0.9)
    assert EntityFilter.of(None, None).keep("ANY", 0.0)
    with pytest.raises(ValueError, match=r"min_score must lie between 0 and 1, not 1\.5"):
        EntityFilter.of(1.5, None)
    with pytest.raises(ValueError, match="min_score must lie between 0 and 1"):
        EntityFilter.of(float("nan"), None)
    with pytest.raises(ValueError, match="unknown label 'FOOD'"):
        EntityFilter.of(None, ["PER", "FOOD"], LABELS)


def test_many_phrases_compile_and_match(tokenize):
    rules = RuleSet([Rule("ORG", f"Company {i} Holdings", id=i) for i in range(20_000)], tokenize=tokenize)
    found = rules.match(words("Shares of Company 12345 Holdings and Company 7 rose."))
    assert [(f.start, f.end, f.rule_id) for f in found] == [(2, 5, 12345)]


def test_phrase_tokenizer_fast_path_agrees_on_random_chunks(tokenize):
    import random
    import string

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits * 2 + "éßÄ"
    chunks = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(3000)}
    for chunk in chunks:
        assert list(tokenize(chunk)) == words(chunk), chunk


def model_result(text: str, model: list[tuple[int, int, str, float]]):
    """A TextResult as TextTagger builds it, for model entities given as token spans."""
    from ml.labels import Span, spans_to_tags
    from ml.pipeline import Entity, TextResult, TokenTag

    tokens = get_tokenizer("en").tokenize(text)
    tags = spans_to_tags([Span(s, e, label) for s, e, label, _ in model], len(tokens), "iob2")
    entities = [Entity(tokens[s].start, tokens[e - 1].end, label, text[tokens[s].start : tokens[e - 1].end], score) for s, e, label, score in model]
    return TextResult(entities, [TokenTag(t.text, t.start, t.end, tag, 0.7) for t, tag in zip(tokens, tags, strict=True)], 1)


@pytest.mark.parametrize("mode", ["override", "fill"])
def test_apply_rules_keeps_character_offsets_in_unicode_text(tokenize, mode):
    from ml.pipeline import apply_rules, entity_dicts

    text = "🙂 Frau Müller-Lüdenscheidt traf 東京 Electric und die Straße AG."
    words_ = words(text)
    person = (words_.index("Frau"), words_.index("traf"), "PER", 0.8)  # "Frau Müller - Lüdenscheidt"
    result = model_result(text, [person])
    rules = RuleSet([Rule("ORG", "東京 electric", id=11), Rule("ORG", "straße ag", id=12), Rule("PER", "Müller", id=13)], mode, tokenize=tokenize)
    ruled = apply_rules(text, result, rules)
    for e in ruled.entities:
        assert text[e.start : e.end] == e.text
    got = [(e.text, e.label, e.source, e.rule_id) for e in ruled.entities]
    if mode == "override":
        assert got == [("Müller", "PER", "rule", 13), ("東京 Electric", "ORG", "rule", 11), ("Straße AG", "ORG", "rule", 12)]
    else:
        assert got == [("Frau Müller-Lüdenscheidt", "PER", "model", None), ("東京 Electric", "ORG", "rule", 11), ("Straße AG", "ORG", "rule", 12)]
    tags = {t.text: (t.tag, t.score) for t in ruled.tokens}
    assert tags["東京"] == ("B-ORG", RULE_SCORE) and tags["Electric"] == ("I-ORG", RULE_SCORE)
    assert tags["traf"] == ("O", 0.7)
    assert tags["Frau"] == (("O", 0.7) if mode == "override" else ("B-PER", 0.7))
    dicts = entity_dicts(ruled, EntityFilter.of(0.9, None))
    assert [d["rule_id"] for d in dicts] == ([11, 12] if mode == "fill" else [13, 11, 12])  # the model's 0.8 is filtered out


def test_apply_rules_reports_what_it_did(tokenize):
    from ml.pipeline import apply_rules

    text = "Acme met Bob"
    result = model_result(text, [(0, 1, "PER", 0.4), (2, 3, "PER", 0.9)])
    fill = apply_rules(text, result, RuleSet([Rule("ORG", "acme", id=1)], "fill", tokenize=tokenize))
    assert fill.rules is not None and [s.rule_id for s in fill.rules.skipped] == [1]
    override = apply_rules(text, result, RuleSet([Rule("ORG", "acme", id=1)], "override", tokenize=tokenize))
    assert override.rules is not None and [r.label for r in override.rules.replaced] == ["PER"]
    assert [(e.text, e.label, e.source) for e in override.entities] == [("Acme", "ORG", "rule"), ("Bob", "PER", "model")]


def test_ner_predict_applies_rules_and_filters(small_model_dir, tmp_path, capsys):
    from ml.cli import main

    rules = tmp_path / "rules.csv"
    rules.write_text("label,phrase,case_sensitive\nPRODUCT,widget pro,false\nORG,Tom,true\n", encoding="utf-8")
    text = "Tom works for Globex in Paris . the widget pro ."

    def run(*extra: str) -> list[tuple]:
        assert main(["predict", "--model", str(small_model_dir), "--text", text, *extra]) == 0
        return [(e["text"], e["label"], e["source"], e["rule_id"]) for e in json.loads(capsys.readouterr().out)["entities"]]

    assert run() == [("Tom", "PER", "model", None), ("Globex", "ORG", "model", None), ("Paris", "LOC", "model", None)]
    assert run("--rules", str(rules)) == [
        ("Tom", "ORG", "rule", 3), ("Globex", "ORG", "model", None), ("Paris", "LOC", "model", None), ("widget pro", "PRODUCT", "rule", 2),
    ]
    assert run("--rules", str(rules), "--rules-mode", "fill", "--labels", "PER,PRODUCT") == [("Tom", "PER", "model", None), ("widget pro", "PRODUCT", "rule", 2)]
    assert run("--rules", str(rules), "--min-score", "1") == [("Tom", "ORG", "rule", 3), ("widget pro", "PRODUCT", "rule", 2)]


def test_ner_predict_conll_applies_rules(small_model_dir, tmp_path, capsys):
    from ml.cli import main

    data = tmp_path / "in.conll"
    data.write_text("Tom O\nvisited O\nParis O\n. O\n", encoding="utf-8")
    rules = tmp_path / "rules.jsonl"
    rules.write_text(json.dumps({"pattern": [{"text": "Paris"}], "label": "ORG"}) + "\n", encoding="utf-8")
    assert main(["predict", "--model", str(small_model_dir), "--input", str(data), "--rules", str(rules), "--format", "conll"]) == 0
    tags = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.strip() and not line.startswith("-DOCSTART-")]
    assert tags == ["B-PER", "O", "B-ORG", "O"]


def test_ner_predict_names_the_bad_rule_line_and_label(small_model_dir, tmp_path, capsys):
    from ml.cli import main

    rules = tmp_path / "rules.jsonl"
    rules.write_text('{"phrase": "ok", "label": "ORG"}\n{"phrase": "", "label": "ORG"}\n', encoding="utf-8")
    assert main(["predict", "--model", str(small_model_dir), "--text", "Tom .", "--rules", str(rules)]) == 2
    assert "line 2: 'phrase' is empty" in capsys.readouterr().err
    assert main(["predict", "--model", str(small_model_dir), "--text", "Tom .", "--labels", "PER,FOOD"]) == 2
    assert "unknown label 'FOOD'" in capsys.readouterr().err


def test_ner_bulk_applies_rules_and_filters(small_model_dir, tmp_path, capsys):
    from ml.cli import main

    data = tmp_path / "in.txt"
    data.write_text("Tom works for Globex in Paris .\nthe widget pro is here .\n", encoding="utf-8")
    rules = tmp_path / "rules.jsonl"
    rules.write_text(json.dumps({"phrase": "widget pro", "label": "PRODUCT"}) + "\n" + json.dumps({"phrase": "Paris", "label": "ORG"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["bulk", str(data), "--out", str(out), "--model", str(small_model_dir), "--output-format", "jsonl", "--workers", "1", "--quiet"]
    assert main([*args, "--rules", str(rules), "--labels", "ORG,PRODUCT"]) == 0
    rows = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text(encoding="utf-8").splitlines()]
    got = [[(e["text"], e["label"], e["source"], e["rule_id"]) for e in row["entities"]] for row in rows]
    assert got == [[("Globex", "ORG", "model", None), ("Paris", "ORG", "rule", 2)], [("widget pro", "PRODUCT", "rule", 1)]]
    capsys.readouterr()
    # the same output folder with other rules is another job: refused, nothing overwritten
    rules.write_text(json.dumps({"phrase": "Globex", "label": "PRODUCT"}) + "\n", encoding="utf-8")
    assert main([*args, "--rules", str(rules), "--labels", "ORG,PRODUCT"]) == 2
    assert main([*args, "--labels", "FOOD"]) == 2
    assert "unknown label 'FOOD'" in capsys.readouterr().err


def test_phrase_matching_equals_brute_force_on_random_rules():
    """Against a reference that tries every rule at every position: the same non-overlapping
    matches (longest first, then leftmost, exact before case-folded, then rule order)."""
    import random

    rng = random.Random(5)
    vocab = ["Acme", "acme", "ACME", "Corp", "corp", "of", "New", "new", "York", "bank", "Bank", "ß", "SS"]
    rules = []
    for i in range(300):
        phrase = " ".join(rng.choice(vocab) for _ in range(rng.choice((1, 1, 2, 2, 3, 4))))
        rules.append(Rule(rng.choice(["ORG", "LOC"]), phrase, case_sensitive=rng.random() < 0.4, id=i + 1))
    ruleset = RuleSet(rules, tokenize=str.split)

    def brute(tokens: list[str]) -> list[tuple[int, int, int]]:
        seen_exact: set[tuple[str, ...]] = set()
        seen_folded: set[tuple[str, ...]] = set()
        candidates = []
        for index, rule in enumerate(rules):  # the first rule of a duplicate phrase keeps it
            key = tuple(rule.phrase.split()) if rule.case_sensitive else tuple(t.casefold() for t in rule.phrase.split())
            seen = seen_exact if rule.case_sensitive else seen_folded
            if key in seen:
                continue
            seen.add(key)
            text = tokens if rule.case_sensitive else [t.casefold() for t in tokens]
            for i in range(len(tokens) - len(key) + 1):
                if tuple(text[i : i + len(key)]) == key:
                    candidates.append((i, i + len(key), 0 if rule.case_sensitive else 1, index))
        taken = [False] * len(tokens)
        kept = []
        for s, e, _p, r in sorted(candidates, key=lambda c: (c[0] - c[1], c[0], c[2], c[3])):
            if not any(taken[s:e]):
                taken[s:e] = [True] * (e - s)
                kept.append((s, e, rules[r].id))
        return sorted(kept)

    for _ in range(300):
        tokens = [rng.choice(vocab) for _ in range(rng.randrange(1, 12))]
        assert [(f.start, f.end, f.rule_id) for f in ruleset.match(tokens)] == brute(tokens), tokens
