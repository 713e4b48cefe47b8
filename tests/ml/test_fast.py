"""The CPU fast path (ml.fast) computes what Tagger.forward computes: tags identical, marginals
within 1e-5 of the model run in float64, batched equal to one by one, for every configuration."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from ml.artifact import build_model, load_model
from ml.data.tensorize import tensorize
from ml.fast import FastPathUnderflow, FastTagger, _CharCNNTables, _NumpyLSTM, _torch_state_dict
from ml.model import CharCNN
from ml.predictor import Predictor
from tests.conftest import small_config

# mixed lengths (1 to 9 tokens), unseen words and characters, a repeated word in one batch
SENTENCES = [
    ["Tom", "visited", "Paris", "."],
    ["Anna"],
    ["the", "office", "of", "Globex", "is", "in", "New", "York", "."],
    ["Zanzibar", "Zanzibar", "met", "Ωmega9", "in", "Zürich", "?"],
    ["Initech", "hired", "Maria", "Lopez", "yesterday", "."],
    ["x"],
]


def reference(model: nn.Module, config, vocab, sentences) -> list[tuple[list[int], list[float]]]:
    """Tagger.forward in float64 on a copy of the model: the exact value of its computation."""
    copy = build_model(config, vocab, with_lm=False)
    copy.load_state_dict(model.state_dict())
    copy.double().eval()
    batch = tensorize(sentences, vocab, 30)
    with torch.inference_mode():
        tags, scores = copy(*batch.inputs)
    return [(tags[i, : len(s)].tolist(), scores[i, : len(s)].tolist()) for i, s in enumerate(sentences)]


def random_model(small_model_dir, **overrides):
    """A randomly initialised tagger of the given configuration on the small model's vocabulary,
    with emission weights scaled up so that tags are decided by clear margins."""
    vocab = load_model(small_model_dir).vocab
    config = small_config(**overrides)
    torch.manual_seed(0)
    model = build_model(config, vocab, with_lm=False).eval()
    with torch.no_grad():
        model.projection.weight.mul_(8.0)
    return model, config, vocab


CONFIGS = [
    {},  # char CNN, BiLSTM, CRF (the shipped model's architecture)
    {"model__head": "softmax"},
    {"model__char_encoder": "lstm", "model__cell": "gru", "model__num_layers": 2},
    {"model__bidirectional": False, "model__num_layers": 2},
    {"model__char_encoder": "none", "model__case_dim": 0, "model__cell": "rnn_tanh"},
    {"model__char_kernel": 5},
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k[7:]}={v}" for k, v in o.items()) or "default")
def test_fast_path_matches_the_model_in_float64(small_model_dir, overrides):
    model, config, vocab = random_model(small_model_dir, **overrides)
    fast = FastTagger(model, vocab, 30)
    expected = reference(model, config, vocab, SENTENCES)
    batched = fast(SENTENCES)
    singles = [fast([s]) for s in SENTENCES]
    for i, (tags, scores) in enumerate(expected):
        assert batched.tags[i].tolist() == tags
        assert batched.scores[i] == pytest.approx(scores, abs=1e-5)
        assert singles[i].tags[0].tolist() == tags
        assert singles[i].scores[0] == pytest.approx(scores, abs=1e-5)


def test_predictor_on_cpu_takes_the_fast_path_with_the_scripted_results(small_model_dir, corpus):
    fast = Predictor.load(small_model_dir)
    scripted = Predictor.load(small_model_dir, fast=False)
    assert fast.fast is not None and scripted.fast is None
    sentences = [s.tokens for s in corpus[:30]] + SENTENCES
    a, b = fast.predict(sentences, batch_size=7), scripted.predict(sentences)
    for x, y in zip(a, b, strict=True):
        assert x.tags == y.tags
        assert [s[:3] for s in x.spans] == [s[:3] for s in y.spans]
        assert [s.score for s in x.spans] == pytest.approx([s.score for s in y.spans], abs=1e-5)
        assert x.scores == pytest.approx(y.scores, abs=1e-5)
    for tokens, x in zip(sentences, a, strict=True):
        (alone,) = fast.predict([tokens])
        assert alone.tags == x.tags
        assert alone.scores == pytest.approx(x.scores, abs=1e-5)


@pytest.mark.parametrize("layers,bidirectional", [(1, True), (2, True), (2, False)])
def test_numpy_lstm_matches_torch_nn(layers, bidirectional):
    torch.manual_seed(1)
    lstm = nn.LSTM(7, 5, num_layers=layers, bidirectional=bidirectional).eval()
    x = torch.randn(9, 1, 7)
    with torch.inference_mode():
        expected = lstm(x)[0][:, 0].numpy()
    got = _NumpyLSTM({k: v.detach() for k, v in lstm.state_dict().items()}, layers, bidirectional, 5)(x[:, 0].numpy().copy())
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("kernel", [3, 5])
def test_char_cnn_tables_match_the_module(kernel):
    torch.manual_seed(2)
    cnn = CharCNN(12, 4, 6, kernel).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0], [1, 0, 0, 0, 0], [11, 2, 7, 9, 10]])
    with torch.inference_mode():
        expected = cnn(ids.unsqueeze(0))[0].numpy()
    tables = _CharCNNTables.of(cnn)
    assert tables is not None
    np.testing.assert_allclose(tables(ids.numpy()), expected, atol=1e-5)


def test_feature_cache_starts_over_when_full_with_the_same_features(small_model_dir):
    model, _, vocab = random_model(small_model_dir)
    fast = FastTagger(model, vocab, 30, cache_size=5, warm_words=0)
    cache = fast.features
    words = ["Tom", "visited", "Paris", ".", "Anna", "met", "Olga"]
    first = cache.gather(words[:4])
    assert len(cache.rows) == 4
    cache.gather(words[4:])  # 4 + 3 > 5: starts over with the three new words
    assert sorted(cache.rows) == sorted(words[4:])
    np.testing.assert_allclose(cache.gather(words[:4]), first, atol=1e-6)
    wide = cache.gather(words)  # more distinct words than the whole cache: computed, not cached
    np.testing.assert_allclose(wide[:4], first, atol=1e-6)


def test_two_threads_tagging_at_once_get_their_own_results(small_model_dir, corpus):
    # the service tags in two lanes, each in its own thread, through one FastTagger; a small cache
    # starts over again and again while the other thread reads from it
    model, _, vocab = random_model(small_model_dir)
    fast = FastTagger(model, vocab, 30, cache_size=12, warm_words=0)
    sentences = [s.tokens for s in corpus[:40]] + SENTENCES
    expected = [(t.tolist(), p.tolist()) for t, p in zip(*FastTagger(model, vocab, 30, warm_words=0)(sentences), strict=True)]
    failures: list[str] = []

    def work(offset: int) -> None:
        for round_ in range(15):
            for i in range(offset, len(sentences), 2):
                batch = sentences[i : i + 3] if round_ % 2 else sentences[i : i + 1]
                got = fast(batch)
                for j, (tags, probs) in enumerate(zip(got.tags, got.scores, strict=True)):
                    want_tags, want_probs = expected[i + j]
                    if tags.tolist() != want_tags or not np.allclose(probs, want_probs, atol=1e-5):
                        failures.append(f"sentence {i + j}")

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]


def test_an_empty_token_is_refused(small_model_dir):
    model, _, vocab = random_model(small_model_dir)
    with pytest.raises(ValueError, match="sentence 0 has an empty token at position 1"):
        FastTagger(model, vocab, 30)([["Tom", ""]])


def test_the_scripted_model_converts_to_torch_nn_names(small_model_dir):
    model, _, _ = random_model(small_model_dir)
    eager = _torch_state_dict(model.encoder)
    scripted = _torch_state_dict(torch.jit.script(model).encoder)
    assert sorted(eager) == sorted(scripted)
    for key, value in eager.items():
        assert torch.equal(value, scripted[key]), key


@pytest.mark.parametrize("spread", [5.0, 60.0])
def test_one_sentence_crf_equals_the_batched_one_even_for_extreme_emissions(small_model_dir, spread):
    # a spread of ~250 per step (60 standard deviations) underflows float64 within four steps: the
    # one-sentence path must notice and rescale every step, giving the batched path's result
    model, _, vocab = random_model(small_model_dir)
    crf = FastTagger(model, vocab, 30, warm_words=0).crf
    assert crf is not None
    rng = np.random.default_rng(3)
    for steps in (1, 2, 7, 23):
        emissions = rng.normal(size=(steps, len(vocab.tags))) * spread
        packed = ([1] * steps, list(range(steps + 1)))
        assert crf.decode_one(emissions).tolist() == crf.decode(emissions, *packed).tolist()
        expected = crf.marginals(emissions, *packed, np.arange(steps - 1, -1, -1))
        with np.errstate(all="ignore"):
            got = crf.marginals_one(emissions)
        assert np.isfinite(expected).all() and np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=1e-9)


def test_emissions_beyond_float64_fall_back_to_the_models_log_space_crf(small_model_dir):
    model, _, vocab = random_model(small_model_dir)
    with torch.no_grad():
        model.projection.weight.mul_(1e4)  # emissions tens of thousands apart
    fast = Predictor(model, vocab, 30, fast=FastTagger(model, vocab, 30, warm_words=0))
    with pytest.raises(FastPathUnderflow):
        assert fast.fast is not None
        fast.fast(SENTENCES)
    plain = Predictor(model, vocab, 30)
    for a, b in zip(fast.predict(SENTENCES), plain.predict(SENTENCES), strict=True):
        assert a.tags == b.tags and a.scores == b.scores
    (one,) = fast.predict(SENTENCES[:1])
    assert one.tags == plain.predict(SENTENCES[:1])[0].tags
