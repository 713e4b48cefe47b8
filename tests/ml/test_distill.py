"""Distillation from an ensemble (ml.distill): the teachers' mean marginals, the student's loss."""
from __future__ import annotations

import json
import re

import pytest
import torch

from ml.artifact import build_model, load_model
from ml.config import ConfigError
from ml.data.tensorize import tensorize
from ml.distill import load_teachers, pad_targets, teacher_marginals
from ml.labels import spans_to_tags
from ml.train import train
from ml.vocab import Vocabularies
from tests.conftest import small_config
from tests.synthetic import synthetic_corpus


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, corpus):
    """A second small model of the same recipe, another seed (less trained: its marginals differ)."""
    out = tmp_path_factory.mktemp("teachers") / "b"
    train(small_config(train__seed=11, train__epochs=5), corpus, corpus, out, progress=False, log=_quiet)
    return out


def test_one_teachers_targets_are_its_marginals_on_each_sentence_alone(small_model_dir, corpus):
    teacher = load_model(small_model_dir)
    sentences = corpus[:9]
    targets = teacher_marginals([teacher], sentences, batch_size=4)  # batched, sorted by length, padded
    for sentence, target in zip(sentences, targets, strict=True):
        alone = tensorize([sentence.tokens], teacher.vocab, teacher.config.model.max_word_length)
        with torch.no_grad():
            expected = teacher.model.head.marginals(teacher.model.emissions(*alone.inputs), alone.mask)[0]
        assert target.shape == (len(sentence.tokens), len(teacher.vocab.tags))
        assert torch.allclose(target, expected, atol=1e-5)
        assert torch.allclose(target.sum(1), torch.ones(len(sentence.tokens)), atol=1e-5)


def test_several_teachers_give_the_mean_of_their_marginals(small_model_dir, second_teacher, corpus):
    a, b = load_model(small_model_dir), load_model(second_teacher)
    sentences = corpus[:6]
    both = teacher_marginals([a, b], sentences)
    only_a, only_b = teacher_marginals([a], sentences), teacher_marginals([b], sentences)
    for mean, x, y in zip(both, only_a, only_b, strict=True):
        assert torch.allclose(mean, (x + y) / 2, atol=1e-6)
    assert any(not torch.allclose(x, y, atol=1e-3) for x, y in zip(only_a, only_b, strict=True))  # two different teachers


def test_a_teacher_with_other_tags_is_refused_by_name(small_model_dir, corpus):
    vocab = Vocabularies.build([s.tokens for s in corpus], ["O", "B-XYZ", "I-XYZ"])
    with pytest.raises(ValueError, match=f"teacher {re.escape(str(small_model_dir))} tags with"):
        load_teachers([small_model_dir], vocab)
    with pytest.raises(ValueError, match="at least one teacher"):
        load_teachers([], vocab)


def test_pad_targets_places_each_target_at_the_start_of_its_row():
    padded = pad_targets([torch.ones(2, 3), torch.full((1, 3), 0.5)], 4)
    assert padded.shape == (2, 4, 3)
    assert padded[0, :2].eq(1).all() and padded[0, 2:].eq(0).all()
    assert padded[1, 0].eq(0.5).all() and padded[1, 1:].eq(0).all()
    with pytest.raises(ValueError, match="more than the batch's 1"):
        pad_targets([torch.ones(2, 3)], 1)


@pytest.mark.parametrize("head", ["crf", "softmax"])
def test_the_distillation_loss_mixes_gold_and_cross_entropy_to_the_targets(head):
    corpus = synthetic_corpus(10, seed=1)
    config = small_config(model__head=head)
    tag_lists = [spans_to_tags(s.spans, len(s.tokens), config.model.tag_scheme) for s in corpus]
    vocab = Vocabularies.build([s.tokens for s in corpus], sorted({t for tags in tag_lists for t in tags}))
    model = build_model(config, vocab, generator=torch.Generator().manual_seed(0)).eval()
    tokens = [s.tokens for s in corpus[:3]]
    batch = tensorize(tokens, vocab, 30, tag_lists[:3])
    width, k = batch.mask.shape[1], len(vocab.tags)
    other = build_model(config, vocab, generator=torch.Generator().manual_seed(1)).eval()  # targets a CRF allows
    with torch.no_grad():
        soft = other.head.marginals(other.emissions(*batch.inputs), batch.mask)
    assert soft.shape == (3, width, k)
    gold = model.loss(*batch.inputs, batch.tags)
    assert torch.allclose(model.loss(*batch.inputs, batch.tags, soft_targets=soft, soft_weight=0.0), gold)
    mixed = model.loss(*batch.inputs, batch.tags, soft_targets=soft, soft_weight=0.25)
    marginals = model.head.marginals(model.emissions(*batch.inputs), batch.mask)
    cross_entropy = sum(
        -sum(float(soft[b, t, j]) * marginals[b, t, j].log() for j in range(k) if soft[b, t, j] > 0)
        for b in range(3) for t in range(len(tokens[b]))
    ) / 3
    assert torch.allclose(mixed, 0.75 * gold + 0.25 * cross_entropy, atol=1e-4)


def test_distillation_teaches_what_the_teachers_say_not_the_gold_tags(corpus, tmp_path):
    """A teacher trained with PER and LOC swapped; a student trained on the true tags but with
    distill_weight 1 learns the teacher's swap, and with weight 0 the truth. Its folder names its teachers."""
    from ml.data import Sentence
    from ml.labels import Span
    from ml.predictor import Predictor, evaluate

    swap = {"PER": "LOC", "LOC": "PER"}
    swapped = [Sentence(list(s.tokens), [Span(x.start, x.end, swap.get(x.label, x.label)) for x in s.spans]) for s in corpus]
    train(small_config(), swapped, swapped, tmp_path / "teacher", progress=False, log=_quiet)
    scores = {}
    for weight in (1.0, 0.0):
        out = tmp_path / f"student{weight}"
        config = small_config(train__distill_from=[str(tmp_path / "teacher")], train__distill_weight=weight, train__epochs=20)
        train(config, corpus, None, out, progress=False, log=_quiet)
        student = load_model(out)
        predictor = Predictor(student.model, student.vocab, student.config.model.max_word_length)
        scores[weight] = (evaluate(predictor, corpus).f1, evaluate(predictor, swapped).f1)
    assert scores[1.0][1] > 0.95 and scores[1.0][0] < 0.6, scores  # the teacher's reading
    assert scores[0.0][0] > 0.95 and scores[0.0][1] < 0.6, scores  # the gold tags
    lineage = json.loads((tmp_path / "student1.0" / "meta.json").read_text())["lineage"]
    assert [t["path"] for t in lineage["teachers"]] == [str(tmp_path / "teacher")]


def test_distillation_settings_are_checked():
    with pytest.raises(ConfigError, match="distill_weight must lie in"):
        small_config(train__distill_from=["a"], train__distill_weight=1.5)
    with pytest.raises(ConfigError, match=r"cannot be combined with train\.mention_replace"):
        small_config(train__distill_from=["a"], train__mention_replace=0.2)
    with pytest.raises(ConfigError, match="list of model folders"):
        small_config(train__distill_from=[""])


def test_the_ensembles_own_prediction_follows_the_scheme_and_its_members(small_model_dir, second_teacher, corpus):
    from ml.distill import ensemble_spans
    from ml.evaluate import entity_scores

    good = load_model(small_model_dir)
    assert entity_scores([s.spans for s in corpus], ensemble_spans([good, good], corpus)).f1 == 1.0
    mixed = ensemble_spans([good, load_model(second_teacher)], corpus[:20])  # decodes to valid spans whatever the mix
    assert all(0 <= s.start < s.end <= len(x.tokens) for x, spans in zip(corpus[:20], mixed, strict=True) for s in spans)


def test_the_teachers_read_the_casings_the_view_asks_for():
    from ml.distill import distill_casings

    assert distill_casings(small_config(train__case_lower=0.2, train__case_title=0.1).train) == ["as_is"]
    same = small_config(train__case_lower=0.2, train__case_title=0.1, train__distill_view="same").train
    assert distill_casings(same) == ["as_is", "lower", "title"]
    with pytest.raises(ConfigError, match="distill_view"):
        small_config(train__distill_view="both")


def test_each_row_gets_the_targets_of_the_casing_it_was_drawn_in(corpus):
    """With per-casing targets, a batch row recased to lower gets the "lower" targets, one left as
    it is the "as_is" ones, and a casing without targets of its own (title) reads "as_is"."""
    from ml.data.augment import CaseAugmenter
    from ml.train import TrainData, Trainer

    config = small_config(train__case_lower=0.4, train__case_title=0.3, train__seed=6)
    tag_lists = [spans_to_tags(s.spans, len(s.tokens), config.model.tag_scheme) for s in corpus]
    vocab = Vocabularies.build([s.tokens for s in corpus], sorted({t for tags in tag_lists for t in tags}))
    k = len(vocab.tags)

    def constant(tag: int) -> list[torch.Tensor]:
        return [torch.nn.functional.one_hot(torch.full((len(s.tokens),), tag), k).float() for s in corpus]

    trainer = Trainer(build_model(config, vocab), vocab, TrainData(corpus), config, soft_targets={"as_is": constant(0), "lower": constant(1)})
    trainer.recase = CaseAugmenter(0.4, 0.0, 0.3, seed=6)
    replay = CaseAugmenter(0.4, 0.0, 0.3, seed=6)
    indices = list(range(12))
    batch = trainer._batch([corpus[i].tokens for i in indices], [tag_lists[i] for i in indices], 0, indices)
    drawn = [replay.draw() for _ in indices]
    assert set(drawn) == {"as_is", "lower", "title"}  # this seed draws all three
    assert batch.soft is not None
    for row, (i, casing_) in enumerate(zip(indices, drawn, strict=True)):
        expected = 1 if casing_ == "lower" else 0
        assert batch.soft[row, : len(corpus[i].tokens)].argmax(1).eq(expected).all(), (row, casing_)
        assert batch.soft[row, len(corpus[i].tokens) :].eq(0).all()
    with pytest.raises(ValueError, match="as they are"):
        Trainer(build_model(config, vocab), vocab, TrainData(corpus), config, soft_targets={"lower": constant(1)})
    with pytest.raises(ValueError, match=r"3 distillation targets \(as_is\)"):
        Trainer(build_model(config, vocab), vocab, TrainData(corpus), config, soft_targets={"as_is": constant(0)[:3]})
