"""Casing augmentation: the recasing itself, the drawn proportions, the config's checks, and that the
training loop really feeds the recased tokens to the network (gold spans unchanged)."""
from __future__ import annotations

from collections import Counter

import pytest

import ml.train
from ml.config import ConfigError
from ml.data.augment import CaseAugmenter, MentionReplacer, recase, title_token
from ml.labels import Span, spans_to_tags
from ml.train import train
from ml.vocab import word_key
from tests.conftest import small_config
from tests.synthetic import synthetic_corpus


def test_recase_each_variant():
    tokens = ["Angela", "MERKEL", "visited", "McDonald's", "in", "São", "Paulo", "3x", "."]
    assert recase(tokens, "as_is") == tokens and recase(tokens, "as_is") is not tokens
    assert recase(tokens, "lower") == ["angela", "merkel", "visited", "mcdonald's", "in", "são", "paulo", "3x", "."]
    assert recase(tokens, "upper") == ["ANGELA", "MERKEL", "VISITED", "MCDONALD'S", "IN", "SÃO", "PAULO", "3X", "."]
    assert recase(tokens, "title") == ["Angela", "Merkel", "Visited", "Mcdonald's", "In", "São", "Paulo", "3x", "."]
    assert title_token("") == ""
    # the word vector a token gets never depends on the casing drawn
    for variant in ("lower", "upper", "title"):
        assert [word_key(t) for t in recase(tokens, variant)] == [word_key(t) for t in tokens]
    with pytest.raises(ValueError, match="unknown casing 'camel'"):
        recase(tokens, "camel")


def test_augmenter_draws_the_configured_proportions_and_is_seeded():
    augmenter = CaseAugmenter(0.3, 0.2, 0.1, seed=7)
    draws = Counter(augmenter.draw() for _ in range(20000))
    assert abs(draws["lower"] / 20000 - 0.3) < 0.02
    assert abs(draws["upper"] / 20000 - 0.2) < 0.02
    assert abs(draws["title"] / 20000 - 0.1) < 0.02
    assert abs(draws["as_is"] / 20000 - 0.4) < 0.02
    a, b = CaseAugmenter(0.3, 0.2, 0.1, seed=7), CaseAugmenter(0.3, 0.2, 0.1, seed=7)
    assert [a.draw() for _ in range(50)] == [b.draw() for _ in range(50)]
    off = CaseAugmenter()
    assert not off.active and off(["Tom", "Berg"]) == ["Tom", "Berg"]


@pytest.mark.parametrize(("lower", "upper", "title", "message"), [(-0.1, 0, 0, "lower"), (0, 1.5, 0, "upper"), (0.5, 0.4, 0.2, r"add up to 1\.100")])
def test_augmenter_refuses_bad_probabilities(lower, upper, title, message):
    with pytest.raises(ValueError, match=message):
        CaseAugmenter(lower, upper, title)


def test_config_checks_the_casing_keys():
    assert small_config(train__case_lower=0.5, train__case_upper=0.3, train__case_title=0.2).train.case_title == 0.2
    with pytest.raises(ConfigError, match=r"train\.case_upper must lie in"):
        small_config(train__case_upper=1.2)
    with pytest.raises(ConfigError, match="at most 1"):
        small_config(train__case_lower=0.6, train__case_upper=0.6)


def test_training_feeds_recased_tokens(monkeypatch):
    seen: list[list[str]] = []
    real = ml.train.tensorize

    def recording(token_lists, *args, **kwargs):
        seen.extend(list(t) for t in token_lists)
        return real(token_lists, *args, **kwargs)

    monkeypatch.setattr(ml.train, "tensorize", recording)
    corpus = synthetic_corpus(30, seed=3)
    config = small_config(train__epochs=2, train__case_upper=0.5, train__case_lower=0.5)
    train(config, corpus, None, None, progress=False, log=lambda m: None)
    assert len(seen) == 2 * len(corpus)
    lowered = sum(all(t == t.lower() for t in toks) for toks in seen)
    raised = sum(all(t == t.upper() for t in toks) for toks in seen)
    assert lowered + raised == len(seen)  # every sequence recased, none left as is
    assert 0.3 * len(seen) < lowered < 0.7 * len(seen)
    originals = {tuple(word_key(t) for t in s.tokens) for s in corpus}
    assert all(tuple(word_key(t) for t in toks) in originals for toks in seen)


def test_mention_replacement_swaps_names_of_the_same_label_and_moves_the_spans():
    data = [
        (["Ann", "met", "Bob", "Smith", "in", "Rome"], [Span(0, 1, "PER"), Span(2, 4, "PER"), Span(5, 6, "LOC")]),
        (["New", "York", "is", "big"], [Span(0, 2, "LOC")]),
    ]
    replacer = MentionReplacer(data, 1.0, seed=0)
    assert replacer.pool == {"PER": [("Ann",), ("Bob", "Smith")], "LOC": [("New", "York"), ("Rome",)]}
    seen = set()
    for _ in range(200):
        tokens, spans = replacer(*data[0])
        assert [s.label for s in spans] == ["PER", "PER", "LOC"]
        assert [tokens[i] for i in (spans[0].end, spans[1].end)] == ["met", "in"]  # the context stays
        mentions = tuple(tuple(tokens[s.start : s.end]) for s in spans)
        assert all(m in replacer.pool[s.label] for m, s in zip(mentions, spans, strict=True))
        assert len(tokens) == 2 + sum(len(m) for m in mentions)  # "met", "in" and the names
        spans_to_tags(spans, len(tokens), "bioes")  # well-formed
        seen.add(mentions)
    assert len(seen) == 8  # every combination drawn: 2 x 2 x 2


def test_mention_replacement_at_zero_and_without_entities_changes_nothing():
    data = [(["Ann", "met", "Bob"], [Span(0, 1, "PER"), Span(2, 3, "PER")])]
    assert not MentionReplacer(data, 0.0).active
    assert MentionReplacer(data, 0.0)(*data[0]) == (["Ann", "met", "Bob"], [Span(0, 1, "PER"), Span(2, 3, "PER")])
    assert MentionReplacer(data, 1.0)(["no", "names"], []) == (["no", "names"], [])
    with pytest.raises(ValueError, match=r"mention replacement probability must lie in \[0, 1\], got 1.5"):
        MentionReplacer(data, 1.5)
    with pytest.raises(ConfigError, match=r"train\.mention_replace must lie in"):
        small_config(train__mention_replace=-0.1)


def test_training_feeds_replaced_mentions(monkeypatch):
    seen: list[tuple[list[str], list[str]]] = []
    real = ml.train.tensorize

    def recording(token_lists, vocab, max_len, tag_lists, *args, **kwargs):
        seen.extend((list(t), list(g)) for t, g in zip(token_lists, tag_lists, strict=True))
        return real(token_lists, vocab, max_len, tag_lists, *args, **kwargs)

    monkeypatch.setattr(ml.train, "tensorize", recording)
    corpus = synthetic_corpus(30, seed=3)
    config = small_config(train__epochs=2, train__mention_replace=1.0)
    train(config, corpus, None, None, progress=False, log=lambda m: None)
    originals = {tuple(s.tokens) for s in corpus}
    changed = [tokens for tokens, _ in seen if tuple(tokens) not in originals]
    assert len(seen) == 2 * len(corpus) and len(changed) > len(seen) // 2
    assert all(len(tokens) == len(tags) for tokens, tags in seen)


def test_word_dropout_replaces_only_real_tokens_at_the_rate():
    import torch

    from ml.data.augment import drop_words
    from ml.vocab import PAD_ID, UNK_ID

    words = torch.full((200, 50), 7)
    mask = torch.ones(200, 50, dtype=torch.bool)
    mask[:, 40:] = False
    words[~mask] = PAD_ID
    out = drop_words(words, mask, 0.1, torch.Generator().manual_seed(0))
    dropped = (out == UNK_ID) & mask
    assert abs(dropped.sum().item() / mask.sum().item() - 0.1) < 0.01
    assert (out[~mask] == PAD_ID).all() and (words == 7).sum() == mask.sum()  # the input is left alone
    assert torch.equal(drop_words(words, mask, 0.0, torch.Generator()), words)
    with pytest.raises(ValueError, match="word dropout"):
        drop_words(words, mask, 1.0, torch.Generator())
    with pytest.raises(ConfigError, match="word_dropout"):
        small_config(train__word_dropout=-0.5)


def test_a_bad_version_fails_before_training(tmp_path):
    epochs: list[int] = []

    class Count(ml.train.Callback):
        def on_epoch_end(self, trainer, log):
            epochs.append(log.epoch)

    with pytest.raises(ValueError, match=r"MAJOR\.MINOR\.PATCH"):
        train(small_config(), synthetic_corpus(10), None, tmp_path / "m", version="0.0.r1", progress=False, log=lambda m: None, callbacks=[Count()])
    assert epochs == [] and not (tmp_path / "m").exists()
