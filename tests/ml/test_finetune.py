"""Fine-tuning from a model folder: growth keeps the base's behaviour and weights, a new label gets
the scheme's constraints, the held-out split is stable, the gate decides as documented."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ml.artifact import load_model
from ml.config import ConfigError
from ml.data import Sentence
from ml.finetune import (
    Correction,
    FinetuneConfig,
    FinetuneInputs,
    _train_config,
    finetune,
    grow,
    is_held_out,
    read_corrections,
    schedule,
    to_sentences,
)
from ml.labels import Span
from ml.modules.crf import CRF, FORBIDDEN
from ml.predictor import Predictor

PRODUCTS = ["Zephyr X9", "Nimbus Pro", "Falcon 7", "Orion Max", "Vega S2"]
CONTEXTS = ["Olga bought a {} yesterday .", "Tom sold his {} in Oslo .", "Anna Berg likes the {} .", "Chen Wei tested the {} in Paris ."]


def product_corrections() -> list[Correction]:
    out = []
    for product in PRODUCTS:
        for context in CONTEXTS:
            text = context.format(product)
            entities = []
            for name, label in (("Olga", "PER"), ("Tom", "PER"), ("Anna Berg", "PER"), ("Chen Wei", "PER"), ("Oslo", "LOC"), ("Paris", "LOC"), (product, "PRODUCT")):
                if name in text:
                    entities.append((text.index(name), text.index(name) + len(name), label))
            out.append(Correction(f"doc-{product}-{context}", text, sorted(entities)))
    return out


def test_grown_model_predicts_what_the_base_did_and_keeps_its_weights(small_model_dir, corpus):
    base = load_model(small_model_dir)
    extra = [Sentence(["Quuxly", "bought", "a", "Zephyr", "X9", "ü"], [Span(3, 5, "PRODUCT")])]
    model, vocab, growth = grow(base, extra, None)
    assert growth.new_labels == ["PRODUCT"] and "quuxly" in growth.new_words and "ü" in growth.new_chars
    assert vocab.tags.itos[: len(base.vocab.tags)] == base.vocab.tags.itos, "old tag ids must not move"
    assert vocab.words.itos[: len(base.vocab.words)] == base.vocab.words.itos
    old, new = base.model.state_dict(), model.state_dict()
    k = len(base.vocab.tags)
    assert torch.equal(new["projection.weight"][:k], old["projection.weight"]) and torch.equal(new["head.transitions"][:k, :k], old["head.transitions"])
    assert torch.equal(new["encoder.weight_hh_l0"], old["encoder.weight_hh_l0"])
    # a new word starts as <unk> did
    assert torch.equal(new["word_embedding.weight"][vocab.words.stoi["quuxly"]], old["word_embedding.weight"][1])
    sentences = [s.tokens for s in corpus[:30]] + [["Quuxly", "visited", "Paris", "."]]
    before = Predictor(base.model, base.vocab, base.config.model.max_word_length).predict(sentences)
    after = Predictor(model.eval(), vocab, base.config.model.max_word_length).predict(sentences)
    assert [r.tags for r in after] == [r.tags for r in before]


def test_a_new_label_gets_the_schemes_transition_constraints(small_model_dir):
    base = load_model(small_model_dir)
    model, vocab, _ = grow(base, [Sentence(["a", "Zephyr", "X9"], [Span(1, 3, "PRODUCT")])], None)
    assert vocab.tags.itos[len(base.vocab.tags):] == ["B-PRODUCT", "I-PRODUCT", "E-PRODUCT", "S-PRODUCT"]
    crf = model.head
    assert isinstance(crf, CRF)
    idx, penalty = vocab.tags.stoi, crf.get_buffer("transition_penalty")
    assert penalty[idx["O"], idx["I-PRODUCT"]] == FORBIDDEN and penalty[idx["B-PER"], idx["E-PRODUCT"]] == FORBIDDEN
    assert penalty[idx["B-PRODUCT"], idx["E-PRODUCT"]] == 0 and penalty[idx["S-PRODUCT"], idx["B-PER"]] == 0
    assert crf.get_buffer("start_penalty")[idx["I-PRODUCT"]] == FORBIDDEN and crf.get_buffer("end_penalty")[idx["E-PRODUCT"]] == 0


def test_held_out_split_is_by_document_stable_and_about_one_in_n():
    keys = [f"document-{i}" for i in range(2000)]
    held = [k for k in keys if is_held_out(k, 5)]
    assert held == [k for k in keys if is_held_out(k, 5)]
    assert 0.17 < len(held) / len(keys) < 0.23
    assert not any(is_held_out(k, 0) for k in keys)


def test_finetune_learns_a_new_label_and_records_before_after_and_lineage(small_model_dir, tmp_path):
    path = tmp_path / "corrections.jsonl"
    with path.open("w") as f:
        for c in product_corrections():
            f.write(json.dumps({"text": c.text, "entities": [{"start": s, "end": e, "label": label} for s, e, label in c.entities], "meta": {"document_id": c.key}}) + "\n")
    corrections = read_corrections(path)
    assert [c.key for c in corrections] == [c.key for c in product_corrections()]
    config = FinetuneConfig(epochs=25, lr=0.01, holdout_every=2, time_holdout=0.0, stop_every=0, threads=1, l2_to_base=0.001)
    messages = []
    result = finetune(FinetuneInputs(small_model_dir, corrections, "1.1.0", tmp_path / "v2"), config, progress=lambda f, m: messages.append((f, m)))
    held = result.metrics["heldout"]
    assert held["documents"] == sum(is_held_out(c.key, 2) for c in corrections) > 0
    assert "PRODUCT" not in held["before"]["per_type"] or held["before"]["per_type"]["PRODUCT"]["f1"] == 0.0
    assert held["after"]["per_type"]["PRODUCT"]["f1"] > 0.8 and held["after"]["f1"] > held["before"]["f1"]
    assert messages[-1][0] == 1.0
    loaded = load_model(tmp_path / "v2")
    assert "PRODUCT" in loaded.meta.labels and loaded.meta.version == "1.1.0"
    lineage = loaded.meta.lineage
    assert lineage["base_model"] == "small 1.0.0" and lineage["new_labels"] == ["PRODUCT"] and lineage["method"] == "finetune"
    assert lineage["train_documents"] + lineage["heldout_documents"] == len(corrections) and lineage["corrections_fingerprint"]
    assert json.loads((tmp_path / "v2" / "metrics.json").read_text())["heldout"]["after"] == held["after"]
    # what was saved is what was measured
    sentences = to_sentences([c for c in corrections if is_held_out(c.key, 2)], "en")
    from ml.predictor import evaluate

    assert evaluate(Predictor.load(tmp_path / "v2"), sentences).f1 == held["after"]["f1"]


def test_frozen_parts_keep_the_base_weights(small_model_dir, tmp_path):
    config = FinetuneConfig(epochs=2, lr=0.01, freeze=["encoder", "char_encoder"], holdout_every=0, threads=1)
    finetune(FinetuneInputs(small_model_dir, product_corrections()[:6], "1.1.0", tmp_path / "v2", pretrained=None), config)
    old, new = load_model(small_model_dir).model.state_dict(), load_model(tmp_path / "v2").model.state_dict()
    for name in old:
        if name.startswith("encoder.") or name == "char_encoder.conv.weight":
            assert torch.equal(old[name], new[name]), name
    k = old["projection.weight"].size(0)
    assert not torch.equal(old["projection.weight"], new["projection.weight"][:k])
    # the base's rows of a frozen part stay, the rows grown for new characters (Z, X, 9, ...) learn
    old_chars, new_chars = old["char_encoder.embedding.weight"], new["char_encoder.embedding.weight"]
    assert new_chars.size(0) > old_chars.size(0)
    assert torch.equal(new_chars[: old_chars.size(0)], old_chars)
    assert not torch.equal(new_chars[old_chars.size(0) :], old_chars[1].expand_as(new_chars[old_chars.size(0) :]))


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="epochs"):
        FinetuneConfig.from_dict({"epochs": "many"})
    with pytest.raises(ConfigError, match="unknown keys"):
        FinetuneConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="freeze"):
        FinetuneConfig().override(["freeze=encoder,decoder"])
    with pytest.raises(ConfigError, match="holdout_every"):
        FinetuneConfig(holdout_every=1).validate()
    with pytest.raises(ConfigError, match=r"finetune\.mention_replace must be in \[0, 1\], got 1.5"):
        FinetuneConfig(mention_replace=1.5).validate()


def test_pull_to_base_holds_the_weights_near_the_base(small_model_dir, tmp_path):
    base = load_model(small_model_dir).model.state_dict()
    k = base["projection.weight"].size(0)

    def deviation(name: str, **settings) -> float:
        config = FinetuneConfig(epochs=3, lr=0.01, holdout_every=0, threads=1, **settings)
        finetune(FinetuneInputs(small_model_dir, product_corrections()[:8], "1.1.0", tmp_path / name, pretrained=None), config)
        new = load_model(tmp_path / name).model.state_dict()
        return max(float((new["encoder.weight_hh_l0"] - base["encoder.weight_hh_l0"]).abs().max()),
                   float((new["projection.weight"][:k] - base["projection.weight"]).abs().max()))

    assert deviation("pulled", pull_to_base=0.5) < 0.5 * deviation("free", pull_to_base=0.0)


def test_a_base_trained_with_weight_averaging_fine_tunes_for_fewer_epochs(small_model_dir, tmp_path):
    """The shipped model's recipe averages its last 5 epochs (train.average_last); a fine-tune of
    fewer epochs than that must not be refused by the inherited setting."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(small_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["train"]["epochs"], config["train"]["average_last"] = 10, 5
    (base / "config.json").write_text(json.dumps(config))
    finetune(FinetuneInputs(base, product_corrections()[:4], "1.1.0", tmp_path / "v2", pretrained=None), FinetuneConfig(epochs=1, holdout_every=0, threads=1))
    assert load_model(tmp_path / "v2").meta.version == "1.1.0"


# --- the splits, the schedule ---------------------------------------------------------------------


def _documents(n: int) -> list[Correction]:
    return [Correction(f"doc-{i}", f"Olga met Tom in Oslo number {i} .", [(0, 4, "PER"), (9, 12, "PER"), (16, 20, "LOC")]) for i in range(n)]


def test_splits_are_disjoint_the_time_split_is_the_newest_and_stopping_never_takes_the_gates_part():
    from ml.finetune import split_all

    docs = _documents(200)
    splits = split_all(docs, FinetuneConfig(holdout_every=5, time_holdout=0.1, stop_every=10))
    keys = [[c.key for c in part] for part in (splits.train, splits.stop, splits.heldout, splits.time)]
    assert sum(map(len, keys)) == 200 and len(set().union(*map(set, keys))) == 200
    assert keys[2] == [c.key for c in docs if is_held_out(c.key, 5)], "the gate's hash part does not depend on the other splits"
    assert len(splits.time) == 20 and keys[3] == [c.key for c in docs if not is_held_out(c.key, 5)][-20:]
    assert 0 < len(splits.stop) < len(splits.train)
    # few documents: no time split and no stopping split, only the hash part is taken out
    small = split_all(docs[:10], FinetuneConfig(holdout_every=5, time_holdout=0.1, stop_every=10))
    assert not small.time and not small.stop and len(small.train) + len(small.heldout) == 10


def test_schedule_fits_ten_and_five_thousand_texts():
    from ml.finetune import schedule

    cfg = FinetuneConfig()
    few, many = schedule(cfg, 60, 17000), schedule(cfg, 7000, 17000)
    assert few.epochs > many.epochs and few.epochs <= cfg.max_epochs and many.epochs >= cfg.min_epochs
    assert few.epochs * few.steps_per_epoch >= min(cfg.target_steps, cfg.max_epochs * few.steps_per_epoch)
    assert few.ewc_lambda > many.ewc_lambda > 0, "a few corrections move the weights less than many"
    assert schedule(cfg, 60, 0).ewc_lambda == 0.0, "no Fisher, no consolidation"
    assert schedule(FinetuneConfig(epochs=4), 60, 17000).epochs == 4
    # without a stopping part nothing watches for overfitting: the smaller budget
    assert schedule(cfg, 400, 17000, stopping=False).epochs == math.ceil(cfg.unwatched_steps / 25) < schedule(cfg, 400, 17000).epochs


def test_settings_are_built_by_the_config_builder():
    assert FinetuneConfig.from_dict({"lr": 1, "freeze": ["encoder"]}).lr == 1.0
    with pytest.raises(ConfigError, match="should be of type int"):
        FinetuneConfig.from_dict({"stop_every": True})
    with pytest.raises(ConfigError, match="freeze"):
        FinetuneConfig.from_dict({"freeze": [1]})
    with pytest.raises(ConfigError, match="time_holdout"):
        FinetuneConfig.from_dict({"time_holdout": 1.0})
    with pytest.raises(ConfigError, match="min_epochs"):
        FinetuneConfig.from_dict({"min_epochs": 9, "max_epochs": 3})


# --- the held-out measures and the gate -----------------------------------------------------------


def test_unseen_mentions_count_only_names_the_training_corrections_never_had():
    from ml.finetune import _part_scores, seen_texts

    training = [Sentence(["We", "met", "Olga", "and", "Zed", "."], [Span(2, 3, "PER")])]
    seen = seen_texts(training, 2)
    assert ("olga",) in seen and ("zed",) in seen and ("met", "olga") in seen and ("zed", "quux") not in seen

    sentences = [Sentence(["Olga", "met", "Zed", "Quux", "."], [Span(0, 1, "PER"), Span(2, 4, "PER")], doc_id=0)]
    memorised = [[Span(0, 1, "PER")]]  # finds the name it was trained on, misses the new one
    general = [[Span(0, 1, "PER"), Span(2, 4, "PER")]]
    scores = _part_scores(sentences, memorised, general, seen={("olga",)})
    assert scores["unseen"]["mentions"] == 1
    assert scores["unseen"]["before"]["f1"] == 0.0 and scores["unseen"]["after"]["f1"] == 1.0
    assert scores["before"]["f1"] == pytest.approx(2 / 3) and scores["after"]["f1"] == 1.0


def test_forgetting_probe_measures_the_share_of_confident_base_spans_kept(small_model_dir, corpus):
    from ml.finetune import forgetting_probe

    base = Predictor.load(small_model_dir)
    texts = [[s.tokens] for s in corpus[:20]]
    same = forgetting_probe(base, base, texts, 0.5)
    assert same is not None and same["agreement"] == 1.0 and same["confident_spans"] > 0

    class Blank:
        def predict_texts(self, texts):
            return [[type("R", (), {"spans": []})() for _ in text] for text in texts]

    blank = forgetting_probe(base, Blank(), texts, 0.5)  # type: ignore[arg-type]
    assert blank is not None and blank["agreement"] == 0.0
    assert forgetting_probe(base, base, [], 0.5) is None


# --- against forgetting -----------------------------------------------------------------------


def test_word_dropout_reads_words_as_unknown_in_training_only():
    from ml.anchoring import RowCorrection

    base = torch.nn.Embedding(10, 4, padding_idx=0)
    module = RowCorrection(base, [3], word_dropout=0.999)
    ids = torch.tensor([[0, 3, 5, 7]])
    torch.manual_seed(0)
    out = module(ids)
    assert torch.equal(out[0, 0], base.weight[0]) and all(torch.equal(out[0, k], base.weight[1]) for k in (1, 2, 3)), "padding stays padding"
    assert torch.equal(module.eval()(ids), base.weight[ids])


def test_row_correction_changes_only_its_rows_and_merges_back():
    from ml.anchoring import RowCorrection

    base = torch.nn.Embedding(10, 4, padding_idx=0)
    original = base.weight.detach().clone()
    module = RowCorrection(base, [3, 7])
    ids = torch.tensor([[0, 3, 5, 7]])
    assert torch.equal(module(ids), original[ids])
    with torch.no_grad():
        module.correction.add_(1.0)
    out = module(ids)
    assert torch.equal(out[0, 0], original[0]) and torch.equal(out[0, 2], original[5]) and torch.equal(out[0, 1], original[3] + 1)
    merged = module.merged()
    assert torch.equal(merged(ids), out) and {k: p.requires_grad for k, p in module.named_parameters()} == {"correction": True, "base.weight": False}
    with pytest.raises(ValueError, match="trainable rows"):
        RowCorrection(torch.nn.Embedding(10, 4), [0])


def test_fisher_round_trips_through_the_folder_as_numbers_and_ewc_holds_the_weights(small_model_dir, corpus, tmp_path):
    import shutil

    from ml.anchoring import FISHER_FILE, fisher_information, load_fisher, save_fisher

    folder = tmp_path / "base"
    shutil.copytree(small_model_dir, folder)
    loaded = load_model(folder)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fisher = fisher_information(loaded.model, loaded.vocab, corpus, loaded.config.model.max_word_length, "bioes", max_sentences=40)
    after = loaded.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items()), "measuring leaves the model as it was"
    assert fisher.sentences == len(corpus) and fisher.sample == 40
    assert fisher.values["word_embedding.weight"].shape == (len(loaded.vocab.words), 1)
    assert all(float(v.min()) >= 0 for v in fisher.values.values()) and float(fisher.values["projection.weight"].sum()) > 0
    save_fisher(folder, fisher)
    again = load_fisher(folder)
    assert again is not None and again.sentences == fisher.sentences and torch.equal(again.values["head.transitions"], fisher.values["head.transitions"])
    assert b"Olga" not in (folder / FISHER_FILE).read_bytes(), "the folder carries numbers, never the corpus's text"
    assert load_fisher(small_model_dir) is None

    base = {k: p.detach() for k, p in load_model(folder).model.named_parameters()}

    def deviation(name: str, ewc: float) -> float:
        """sum F (theta - theta_base)^2 over the base's block: what the penalty keeps small."""
        config = FinetuneConfig(epochs=3, lr=0.01, holdout_every=0, threads=1, ewc=ewc)
        result = finetune(FinetuneInputs(folder, product_corrections()[:8], "1.1.0", tmp_path / name, pretrained=None), config)
        assert (tmp_path / name / FISHER_FILE).is_file(), "a fine-tuned version carries the base's Fisher along"
        assert result.metrics["schedule"]["ewc_lambda"] == (ewc * len(corpus) / result.meta.lineage["train_sentences"] if ewc else 0.0)
        params = {k: p.detach() for k, p in load_model(tmp_path / name).model.named_parameters()}
        return sum(float((fisher.values[k] * (params[k][tuple(slice(0, n) for n in b.shape)] - b).pow(2)).sum())
                   for k, b in base.items() if k != "word_embedding.weight")

    assert deviation("held", 1e4) < 0.2 * deviation("free", 0.0)
    # a version fine-tuned from the base carries its Fisher, and a fine-tune from that version uses it (the lineage says whose it is)
    chained = finetune(FinetuneInputs(tmp_path / "held", product_corrections()[:8], "1.2.0", None, pretrained=None), FinetuneConfig(epochs=1, holdout_every=0, threads=1))
    assert chained.metrics["schedule"]["ewc_lambda"] > 0 and chained.meta.lineage["fisher_measured_on"] == fisher.measured_on


def test_a_fisher_measured_on_other_weights_is_not_used(small_model_dir, corpus, tmp_path):
    import dataclasses
    import shutil

    from ml.anchoring import fisher_information, save_fisher

    folder = tmp_path / "base"
    shutil.copytree(small_model_dir, folder)
    loaded = load_model(folder)
    fisher = fisher_information(loaded.model, loaded.vocab, corpus, loaded.config.model.max_word_length, "bioes", max_sentences=10)
    save_fisher(folder, dataclasses.replace(fisher, measured_on="0" * 64))  # as if the model had been replaced in place
    messages: list[str] = []
    result = finetune(FinetuneInputs(folder, product_corrections()[:4], "1.1.0", tmp_path / "v2", pretrained=None),
                      FinetuneConfig(epochs=1, holdout_every=0, threads=1), progress=lambda f, m: messages.append(m))
    assert any("measured on other weights" in m for m in messages) and result.metrics["schedule"]["ewc_lambda"] == 0.0
    assert result.meta.lineage["fisher_sentences"] == 0 and not (tmp_path / "v2" / "fisher.safetensors").exists()


def test_distillation_term_is_zero_for_the_base_itself(small_model_dir, corpus):
    from ml.finetune import DistillTerm

    loaded = load_model(small_model_dir)
    term = DistillTerm(loaded.model, loaded.vocab, corpus[:10], loaded.config.model.max_word_length, 4, 1.0)
    assert len(term.batches) == 3
    assert float(term(loaded.model).detach()) == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        loaded.model.projection.bias[0] += 5.0
    assert float(term(loaded.model).detach()) > 0.01


def test_finetune_reports_every_measure_and_stops_early_on_its_own_split(small_model_dir, corpus, tmp_path):
    corrections = _documents(80)
    stored = [" ".join(s.tokens) for s in corpus[:30]]
    config = FinetuneConfig(epochs=6, lr=0.01, threads=1, patience=1, distill=0.5, rehearsal_ratio=0.5)
    messages: list[str] = []
    result = finetune(FinetuneInputs(small_model_dir, corrections, "1.1.0", None, stored_texts=stored, pretrained=None), config,
                      progress=lambda f, m: messages.append(m))
    m = result.metrics
    lineage = result.meta.lineage
    assert lineage["stop_documents"] > 0 and lineage["time_documents"] == 8
    assert m["heldout"]["documents"] == lineage["heldout_documents"] and m["time"]["documents"] == 8
    assert m["heldout"]["unseen"]["mentions"] == 0, "every held-out name occurs in the training corrections"
    assert m["probe"] is not None and 0.0 <= m["probe"]["agreement"] <= 1.0
    assert m["schedule"]["epochs"] == 6 and 1 <= m["schedule"]["best_epoch"] <= len(m["history"]) <= 6
    assert all(h["stop_f1"] is not None for h in m["history"])
    assert any(msg.startswith("schedule:") for msg in messages) and result.path is None and result.model is not None


def test_full_retrain_trains_the_base_recipe_on_the_corpus_and_the_corrections(small_model_dir, corpus, tmp_path):
    import shutil

    from ml.finetune import retrain

    base = tmp_path / "base"
    shutil.copytree(small_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["train"]["epochs"], config["train"]["patience"] = 3, 3  # the recipe, shortened for the test
    config["train"]["distill_from"] = [str(tmp_path / "teacher-on-another-machine")]  # a distilled recipe's teachers: not used
    (base / "config.json").write_text(json.dumps(config))
    corrections = _documents(30)
    with pytest.raises(ValueError, match="needs the base corpus"):
        retrain(FinetuneInputs(base, corrections, "1.1.0", tmp_path / "v2"))
    messages: list[str] = []
    result = retrain(FinetuneInputs(base, corrections, "1.1.0", tmp_path / "v2", base_data=(corpus, corpus[:20]), pretrained=None),
                     FinetuneConfig(threads=1, correction_weight=2), progress=lambda f, m: messages.append(m))
    assert result.meta.lineage["method"] == "retrain" and result.meta.version == "1.1.0" and result.metrics["method"] == "retrain"
    assert result.meta.lineage["train_sentences"] == len(corpus) + 2 * result.meta.lineage["train_documents"]
    assert result.metrics["heldout"]["documents"] == result.meta.lineage["heldout_documents"] and "dev" in result.metrics
    assert any(m.startswith("full retrain with small 1.0.0's recipe (3 epochs)") for m in messages)
    assert json.loads((tmp_path / "v2" / "metrics.json").read_text())["heldout"] == result.metrics["heldout"]
    assert load_model(tmp_path / "v2").meta.lineage["corrections"] == 30
    assert "teachers" not in result.meta.lineage


def test_ner_fisher_writes_the_file_into_the_model_folder(small_model_dir, corpus, tmp_path, capsys):
    import shutil

    from ml.anchoring import load_fisher, weights_digest
    from ml.cli import main
    from ml.data.conll import write_conll

    folder = tmp_path / "base"
    shutil.copytree(small_model_dir, folder)
    data = tmp_path / "train.txt"
    with data.open("w") as f:
        write_conll(corpus, f)
    assert main(["fisher", "--model", str(folder), "--data", str(data), "--max-sentences", "20"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"fisher": str(folder / "fisher.safetensors"), "corpus_sentences": len(corpus), "measured_on": 20}
    fisher = load_fisher(folder)
    assert fisher is not None and fisher.measured_on == weights_digest(folder)
    assert main(["fisher", "--model", str(folder), "--data", str(tmp_path / "missing.txt")]) == 2


def test_the_fine_tune_trains_with_its_own_mention_replacement(small_model_dir):
    loaded = load_model(small_model_dir)
    cfg = FinetuneConfig(mention_replace=0.4)
    train = _train_config(loaded, cfg, schedule(cfg, 100, 0)).train
    assert train.mention_replace == 0.4 and train.average_last == 0
    assert _train_config(loaded, FinetuneConfig(), schedule(FinetuneConfig(), 100, 0)).train.mention_replace == 0.0


def test_a_case_folded_character_table_grows_by_lower_case_characters():
    from ml.finetune import _grown_vocab
    from ml.vocab import Vocabularies

    base = Vocabularies.build([["Oslo"]], ["O", "S-LOC"], fold_char_case=True)
    grown, growth = _grown_vocab(base, [Sentence(["QUAY", "Zürich", "Oslo"], [])], "bioes")
    assert growth.new_chars == sorted(set("quayzürich") - set("oslo"))  # lower-case, each once; O, S, L are known
    assert grown.chars.fold_case and grown.chars.index("Q") == grown.chars.index("q") != 1
    assert grown.chars.itos[: len(base.chars)] == base.chars.itos  # old ids unchanged
    plain, _ = _grown_vocab(Vocabularies.build([["Oslo"]], ["O", "S-LOC"]), [Sentence(["QUAY"], [])], "bioes")
    assert "Q" in plain.chars.itos and not plain.chars.fold_case
