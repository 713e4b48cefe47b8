"""End to end on a tiny corpus: learn it exactly, save, reload, export, train under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml.artifact import FORMAT, ModelLoadError, load_model
from ml.config import Config, ConfigError
from ml.data.conll import write_conll
from ml.export import export_torchscript
from ml.predictor import Predictor, evaluate
from ml.train import Callback, train
from ml.vocab import casing
from tests.conftest import small_config
from tests.support import free_port
from tests.synthetic import synthetic_corpus

ROOT = Path(__file__).resolve().parents[2]


def test_small_model_learns_the_corpus_and_reloads_identically(small_model_dir, corpus):
    predictor = Predictor.load(small_model_dir)
    scores = evaluate(predictor, corpus)
    assert scores.f1 == 1.0 and scores.sentences == len(corpus)
    metrics = json.loads((small_model_dir / "metrics.json").read_text())
    assert metrics["dev"]["f1"] == 1.0 and metrics["history"]
    meta = json.loads((small_model_dir / "meta.json").read_text())
    assert meta["format"] == FORMAT and meta["language"] == "en" and meta["labels"] == ["LOC", "ORG", "PER"]
    assert meta["lineage"]["train_sentences"] == len(corpus)
    again = Predictor.load(small_model_dir)
    first = predictor.predict([s.tokens for s in corpus])
    second = again.predict([s.tokens for s in corpus])
    assert [r.tags for r in first] == [r.tags for r in second]
    assert [r.scores for r in first] == [r.scores for r in second]


def test_batched_prediction_equals_one_by_one(small_model_dir, corpus):
    predictor = Predictor.load(small_model_dir)
    tokens = [s.tokens for s in corpus[:20]]
    batched = predictor.predict(tokens, batch_size=64)
    for toks, result in zip(tokens, batched, strict=True):
        (alone,) = predictor.predict([toks])
        assert alone.tags == result.tags
        assert alone.scores == pytest.approx(result.scores, abs=1e-5)


def test_unseen_words_still_get_features(small_model_dir):
    # "Zanzibar" was never seen: the char CNN and casing still mark it as a likely location
    (result,) = Predictor.load(small_model_dir).predict([["Tom", "visited", "Zanzibar", "."]])
    assert result.tags[0] in ("S-PER", "B-PER")
    assert result.tags[2] != "O"


def test_exported_torchscript_predicts_identically_in_a_fresh_process(small_model_dir, corpus, tmp_path):
    archive = export_torchscript(small_model_dir, tmp_path / "tagger.pt")
    sentences = [s.tokens for s in corpus[:15]] + [["Unseen", "Wörds", "in", "Zürich", "?"]]
    expected = Predictor.load(small_model_dir).predict(sentences)
    script = (
        "import json, sys, torch\n"
        "assert not any(m.split('.')[0] in ('ml', 'service') for m in sys.modules)\n"
        "m = torch.jit.load(sys.argv[1])\n"
        "tags, scores = m(json.loads(sys.stdin.read()))\n"
        "assert not any(m.split('.')[0] in ('ml', 'service') for m in sys.modules)\n"
        "print(json.dumps({'tags': tags, 'scores': scores, 'version': m.version}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(archive)], input=json.dumps(sentences), capture_output=True, text=True,
        cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=True,
    )
    got = json.loads(out.stdout)
    assert got["tags"] == [r.tags for r in expected]
    for a, b in zip(got["scores"], [r.scores for r in expected], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert got["version"] == "1.0.0"


def test_exported_features_match_python_on_any_unicode(small_model_dir, tmp_path):
    from ml.vocab import casing, word_key

    loaded = load_model(small_model_dir)
    archive = torch.jit.load(str(export_torchscript(small_model_dir, tmp_path / "t.pt")))
    tokens = ["ÖSTERREICH", "İstanbul", "ΟΔΟΣ", "ǅemal", "٣٤", "x²", "Ⅻ", "北京", "😀", "Ωmega9", "naïve", "ß", "ﬁ", "A", "Tom"]
    for tok in tokens:
        key, case, chars = archive.token_features(tok)
        assert key == word_key(tok), tok
        assert case == casing(tok), tok
        assert chars == [loaded.vocab.chars.index(ch) for ch in tok[:30]], tok


@pytest.mark.parametrize("overrides", [
    {"model__head": "softmax", "model__tag_scheme": "iob2"},
    {"model__char_encoder": "lstm", "model__cell": "gru", "model__num_layers": 2, "model__backend": "cudnn"},
    {"model__lm_weight": 0.1, "model__lm_vocab": 20},
    {"model__truecase_weight": 0.5, "train__case_lower": 0.5},
])
def test_other_configurations_learn_the_corpus(overrides, corpus, tmp_path):
    config = small_config(**overrides)
    result = train(config, corpus, corpus, tmp_path / "m", progress=False, log=lambda m: None)
    assert result.dev.f1 == 1.0
    loaded = load_model(tmp_path / "m")
    assert loaded.model.lm_head is None  # the auxiliary LM is training-only and not saved
    assert loaded.model.truecase_head is None  # so is the truecasing head


def test_truecase_targets_are_the_casing_before_recasing():
    from ml.train import truecase_targets

    targets = truecase_targets([["Tom", "met", "NATO"], ["x"]], 4)
    assert targets.tolist() == [[casing("Tom"), casing("met"), casing("NATO"), 0], [casing("x"), 0, 0, 0]]


def test_the_truecasing_loss_is_the_masked_cross_entropy_of_the_original_casing():
    import torch.nn.functional as F

    from ml.artifact import build_model
    from ml.data.tensorize import tensorize
    from ml.labels import spans_to_tags
    from ml.train import truecase_targets
    from ml.vocab import Vocabularies

    corpus = synthetic_corpus(10, seed=1)
    config = small_config(model__truecase_weight=2.0)
    tag_lists = [spans_to_tags(s.spans, len(s.tokens), config.model.tag_scheme) for s in corpus]
    vocab = Vocabularies.build([s.tokens for s in corpus], sorted({t for tags in tag_lists for t in tags}))
    model = build_model(config, vocab).eval()
    tokens = [s.tokens for s in corpus[:3]]
    batch = tensorize([[t.lower() for t in ts] for ts in tokens], vocab, 30, tag_lists[:3])
    targets = truecase_targets(tokens, batch.mask.shape[1])
    plain = model.loss(*batch.inputs, batch.tags)
    with_truecase = model.loss(*batch.inputs, batch.tags, truecase_targets=targets, truecase_weight=2.0)
    states = model.encode(*batch.inputs)
    logits = model.truecase_head(states)
    expected = sum(F.cross_entropy(logits[b, : len(tokens[b])], targets[b, : len(tokens[b])], reduction="sum") for b in range(3)) / 3
    assert torch.allclose(with_truecase - plain, 2.0 * expected, atol=1e-5)


def test_model_trained_with_cudnn_backend_exports_through_the_scripted_one(corpus, tmp_path):
    config = small_config(model__backend="cudnn", train__epochs=3)
    train(config, corpus, corpus, tmp_path / "m", progress=False, log=lambda m: None)
    scripted = load_model(tmp_path / "m", backend="script")
    native = load_model(tmp_path / "m")
    words = [s.tokens for s in corpus[:10]]
    a = Predictor(scripted.model, scripted.vocab, 30).predict(words)
    b = Predictor(native.model, native.vocab, 30).predict(words)
    assert [r.tags for r in a] == [r.tags for r in b]


def test_loading_an_incompatible_folder_fails_clearly(small_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(small_model_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["format"] = FORMAT + 1
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"model format 2.*retrain"):
        load_model(copy)
    (copy / "weights.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"missing weights\.safetensors"):
        load_model(copy)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.cell = 'lstmm'"):
        Config.from_dict({"model": {"cell": "lstmm"}})
    with pytest.raises(ConfigError, match=r"unknown keys \['hiden_size'\]"):
        Config.from_dict({"model": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match="echo_state_radius applies to the basic RNN"):
        Config.from_dict({"model": {"cell": "gru", "echo_state_radius": 0.9}})
    with pytest.raises(ConfigError, match="should be of type int"):
        Config.from_dict({"train": {"epochs": "many"}})
    with pytest.raises(ValueError, match="token features are"):
        from ml.model import Tagger
        from ml.modules.crf import CRF
        from ml.modules.rnn import build_encoder

        Tagger(torch.nn.Embedding(5, 4), None, None, build_encoder("script", "lstm", 7, 3), CRF(3), 3, 0.0)
    path = tmp_path / "c.toml"
    path.write_text("[model]\ncell = 'gru'\n[train]\nepochs = 2\n")
    config = Config.load(path).override(["train.lr=0.5", "model.head=softmax"])
    assert (config.model.cell, config.train.epochs, config.train.lr, config.model.head) == ("gru", 2, 0.5, "softmax")


def _write_corpus(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.txt", "w") as f:
        write_conll(synthetic_corpus(n, seed), f)
    with open(folder / "dev.txt", "w") as f:
        write_conll(synthetic_corpus(n // 2, seed + 1), f)


def _small_config_file(path: Path, epochs: int) -> Path:
    path.write_text(
        "[model]\nhidden_size = 32\nword_dim = 16\nchar_dim = 8\nchar_hidden = 16\ncase_dim = 4\ndropout = 0.1\n"
        f"[train]\nepochs = {epochs}\nbatch_size = 8\noptimizer = 'adam'\nlr = 0.01\nlr_decay = 0.0\nseed = 3\n"
    )
    return path


def test_cli_train_evaluate_predict(tmp_path):
    _write_corpus(tmp_path / "data", 60, 1)
    config = _small_config_file(tmp_path / "small.toml", 25)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ml", *args], capture_output=True, text=True, env=env, cwd=tmp_path)

    out = run("train", "--config", str(config), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--quiet", "--version", "2.0.1")
    assert out.returncode == 0, out.stderr
    assert "dev F1" in out.stderr and json.loads(out.stdout)["dev_f1"] > 0.9
    out = run("evaluate", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data" / "dev.txt"), "--json")
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)
    assert {"precision", "recall", "f1", "per_type", "tokens", "sentences"} <= set(scores) and scores["f1"] > 0.9
    assert scores["model"]["version"] == "2.0.1"
    out = run("predict", "--model", str(tmp_path / "m"), "--text", "Anna Berg visited  Oslo.")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    for e in record["entities"]:
        assert record["text"][e["start"] : e["end"]] == e["text"]
    assert {e["text"] for e in record["entities"]} == {"Anna Berg", "Oslo"}
    (tmp_path / "in.jsonl").write_text('{"text": "Olga visited Kyoto ."}\n{"text": ""}\n')
    out = run("predict", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert out.returncode == 2 and "in.jsonl:2:" in out.stderr and not (tmp_path / "out.jsonl").exists()
    out = run("predict", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "data" / "dev.txt"), "--output", str(tmp_path / "out.conll"))
    assert out.returncode == 0, out.stderr
    from ml.data.conll import read_conll

    predicted, gold = read_conll(tmp_path / "out.conll"), read_conll(tmp_path / "data" / "dev.txt")
    assert [s.tokens for s in predicted] == [s.tokens for s in gold]
    out = run("evaluate", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and "missing.txt does not exist" in out.stderr
    (tmp_path / "bad.txt").write_text("a O\nb O\nd e f\n")
    out = run("evaluate", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "bad.txt"))
    assert out.returncode == 2 and "bad.txt:3: expected 2 columns" in out.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_gloo(tmp_path):
    _write_corpus(tmp_path / "data", 48, 2)
    config = _small_config_file(tmp_path / "small.toml", 4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m", "ml",
         "train", "--config", str(config), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stderr
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len(metrics["history"]) == 4
    load_model(tmp_path / "m")


class _Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_train_start(self, trainer):
        self.events.append("train_start")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start {epoch}")

    def on_batch_end(self, trainer, loss, sequences, tokens):
        if not self.events[-1].startswith("batch"):
            self.events.append("batch")

    def on_epoch_end(self, trainer, log):
        self.events.append(f"epoch_end {log.epoch} dev {log.dev_f1}")

    def on_train_end(self, trainer):
        self.events.append("train_end")

    def on_result(self, trainer, result):
        self.events.append(f"result {result.best_epoch}")


def test_trainer_plugs_in_optimizer_loss_terms_and_trains_without_dev(corpus):
    """What fine-tuning and train+dev fits need, without editing the Trainer: an already-built model,
    param groups from an optimizer factory (one frozen part), an extra loss term, no dev data."""
    from ml.artifact import build_model
    from ml.train import TrainData, Trainer, build_vocab

    config = small_config(train__epochs=3)
    vocab, _ = build_vocab(config, corpus)
    model = build_model(config, vocab, generator=torch.Generator().manual_seed(0))
    frozen_before = model.word_embedding.weight.detach().clone()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups_seen: list[int] = []

    def optimizer_factory(m, tc):
        groups = [
            {"params": list(m.encoder.parameters()), "lr": tc.lr},
            {"params": [p for n, p in m.named_parameters() if not n.startswith(("encoder.", "word_embedding."))], "lr": tc.lr / 10},
        ]
        groups_seen.append(len(groups))
        return torch.optim.NAdam(groups)

    calls = []

    def pull_to_base(m):  # an L2 pull toward the starting weights, as a fine-tune would use
        calls.append(1)
        return 0.01 * sum(((p - base[n]) ** 2).sum() for n, p in m.named_parameters() if n.startswith("encoder."))

    recorder = _Recorder()
    trainer = Trainer(model, vocab, TrainData(corpus, None), config, [recorder], optimizer_factory=optimizer_factory, loss_terms=[pull_to_base])
    result = trainer.fit()
    assert isinstance(trainer.optimizer, torch.optim.NAdam) and groups_seen == [2]
    assert torch.equal(model.word_embedding.weight, frozen_before)  # not in any group: untouched
    assert not torch.equal(model.state_dict()["encoder.weight_hh_l0"], base["encoder.layers.0.weight_hh"][0])
    batches_per_epoch = -(-len(corpus) // config.train.batch_size)
    assert len(calls) >= 3 * batches_per_epoch
    assert [h.epoch for h in result.history] == [1, 2, 3] and result.best_epoch == 3
    assert all(h.dev_f1 == -1.0 for h in result.history)
    assert recorder.events == [
        "train_start",
        "epoch_start 1", "batch", "epoch_end 1 dev -1.0",
        "epoch_start 2", "batch", "epoch_end 2 dev -1.0",
        "epoch_start 3", "batch", "epoch_end 3 dev -1.0",
        "train_end", "result 3",
    ]


def test_dev_selecting_callbacks_need_dev_data(corpus):
    from ml.artifact import build_model
    from ml.train import EarlyStopping, KeepBest, TrainData, Trainer, build_vocab

    config = small_config(train__epochs=1)
    vocab, _ = build_vocab(config, corpus)
    for callback in (KeepBest(), EarlyStopping(3)):
        trainer = Trainer(build_model(config, vocab), vocab, TrainData(corpus, None), config, [callback])
        with pytest.raises(ValueError, match="no dev data"):
            trainer.fit()


def test_early_stopping_restores_the_best_epoch(corpus, tmp_path):
    """Patience 1 stops at the first epoch that does not improve dev F1 (at the latest once it reaches
    1.0), and the saved model holds the best epoch's weights, not the last one's."""
    config = small_config(train__epochs=40, train__patience=1)
    result = train(config, corpus, corpus, tmp_path / "m", progress=False, log=lambda m: None)
    history = result.history
    assert len(history) < 40  # stopped early
    best = max(range(len(history)), key=lambda i: history[i].dev_f1)
    assert result.best_epoch == history[best].epoch
    assert all(h.dev_f1 <= history[best].dev_f1 for h in history[best + 1 :]) and len(history) - 1 - best == 1
    assert result.dev.f1 == pytest.approx(history[best].dev_f1, abs=0.02)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["best_epoch"] == result.best_epoch and metrics["dev"]["f1"] == result.dev.f1


def test_nadam_is_an_optimizer_choice():
    from ml.artifact import build_model
    from ml.train import build_optimizer
    from ml.vocab import Vocabularies

    config = small_config(train__optimizer="nadam")
    vocab = Vocabularies.build([["a"]], ["O", "S-PER"])
    assert isinstance(build_optimizer(build_model(config, vocab), config.train), torch.optim.NAdam)
    with pytest.raises(ConfigError, match=r"train\.optimizer = 'nadamm' is not one of sgd, adam, nadam"):
        small_config(train__optimizer="nadamm")


def test_average_last_ends_with_the_mean_of_the_last_epochs_weights(corpus):
    """AverageWeights(2) over 3 epochs: the model ends with the mean of its weights at the ends of
    epochs 2 and 3; dev still scores every epoch and the result is the average's dev score."""
    from ml.artifact import build_model
    from ml.train import AverageWeights, TrainData, Trainer, build_vocab

    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(Callback):
        def on_epoch_end(self, trainer, log):
            snapshots[log.epoch] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    config = small_config(train__epochs=3, train__average_last=2)
    vocab, _ = build_vocab(config, corpus)
    model = build_model(config, vocab, generator=torch.Generator().manual_seed(0))
    result = Trainer(model, vocab, TrainData(corpus, corpus), config, [Snapshot(), AverageWeights(2)]).fit()
    assert [h.epoch for h in result.history] == [1, 2, 3] and all(h.dev_f1 >= 0 for h in result.history)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            mean = ((snapshots[2][key].double() + snapshots[3][key].double()) / 2).float()
            assert torch.allclose(value, mean, atol=1e-7), key
    assert not torch.equal(model.state_dict()["projection.weight"], snapshots[3]["projection.weight"])
    assert result.dev.f1 >= 0 and result.best_epoch == 3


def test_average_last_replaces_dev_selection_in_the_default_callbacks():
    from ml.train import AverageWeights, EarlyStopping, KeepBest, MergeWordCorrection, SaveModel, _merge_before_save, default_callbacks

    config = small_config(train__epochs=3, train__average_last=2)
    callbacks = _merge_before_save(default_callbacks(config, Path("m"), "m", "0.1.0", None, False, lambda m: None))
    kinds = [type(c) for c in callbacks]
    assert KeepBest not in kinds and EarlyStopping not in kinds
    # averaged first, then the word correction merged, then saved
    assert kinds.index(AverageWeights) < kinds.index(MergeWordCorrection) < kinds.index(SaveModel)
    with pytest.raises(ConfigError, match="average_last"):
        small_config(train__epochs=3, train__average_last=4).validate()
    with pytest.raises(ValueError, match="at least one epoch"):
        AverageWeights(0)


def test_a_case_folded_model_reads_every_case_alike_on_every_path(corpus, tmp_path):
    """model.char_fold_case: the character encoder sees ``paris`` for Paris and PARIS; the casing
    feature still differs. The CPU fast path, the scripted model and the TorchScript export read
    the same ids."""
    from ml.vocab import casing

    train(small_config(model__char_fold_case=True, train__epochs=3), corpus, corpus, tmp_path / "m", progress=False, log=lambda m: None)
    loaded = load_model(tmp_path / "m")
    assert loaded.vocab.chars.fold_case and all(ch == ch.lower() for ch in loaded.vocab.chars.itos[2:])
    archive = torch.jit.load(str(export_torchscript(tmp_path / "m", tmp_path / "t.pt")))
    for tok in ["Paris", "PARIS", "paris", "ÖSTERREICH", "ǅemal", "Ωmega9"]:
        _, case, chars = archive.token_features(tok)
        assert case == casing(tok) and chars == [loaded.vocab.chars.index(ch) for ch in tok[:30]], tok
    assert archive.token_features("PARIS")[2] == archive.token_features("paris")[2]
    sentences = [s.tokens for s in corpus[:10]] + [[t.upper() for t in s.tokens] for s in corpus[:10]]
    fast, scripted = Predictor.load(tmp_path / "m"), Predictor.load(tmp_path / "m", fast=False)
    assert [r.tags for r in fast.predict(sentences)] == [r.tags for r in scripted.predict(sentences)]
