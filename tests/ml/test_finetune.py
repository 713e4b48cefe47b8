"""Fine-tuning from a model folder: growth keeps the base's behaviour and weights, a new label gets
the scheme's constraints, the held-out split is stable, the gate decides as documented."""
from __future__ import annotations

import json

import pytest
import torch

from ml.artifact import load_model
from ml.config import ConfigError
from ml.data import Sentence
from ml.finetune import Correction, FinetuneConfig, finetune, grow, is_held_out, promotion_decision, read_corrections, to_sentences
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
    config = FinetuneConfig(epochs=25, lr=0.01, holdout_every=2, threads=1, l2_to_base=0.001)
    messages = []
    result = finetune(small_model_dir, corrections, tmp_path / "v2", "1.1.0", config, progress=lambda f, m: messages.append((f, m)))
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
    finetune(small_model_dir, product_corrections()[:6], tmp_path / "v2", "1.1.0", config, pretrained=None)
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


def test_promotion_gate():
    def scores(f1, per):
        return {"f1": f1, "per_type": {k: {"f1": v, "support": s} for k, (v, s) in per.items()}}

    before = scores(0.70, {"PER": (0.9, 50), "LOC": (0.8, 40), "MISC": (0.5, 3)})
    assert promotion_decision(before, scores(0.80, {"PER": (0.9, 50), "LOC": (0.85, 40), "MISC": (0.0, 3)}), 0.01, 0.02, 10).promote
    low = promotion_decision(before, scores(0.705, {"PER": (0.9, 50), "LOC": (0.8, 40)}), 0.01, 0.02)
    assert not low.promote and "below the required 1.00" in low.reason
    drop = promotion_decision(before, scores(0.80, {"PER": (0.85, 50), "LOC": (0.95, 40), "MISC": (0.5, 3)}), 0.01, 0.02)
    assert not drop.promote and drop.worst_label == "PER" and "label PER loses 5.00" in drop.reason
    assert not promotion_decision(None, None, 0.0, 1.0).promote


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="epochs"):
        FinetuneConfig.from_dict({"epochs": "many"})
    with pytest.raises(ConfigError, match="unknown settings"):
        FinetuneConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="freeze"):
        FinetuneConfig().override(["freeze=encoder,decoder"])
    with pytest.raises(ConfigError, match="holdout_every"):
        FinetuneConfig(holdout_every=1).validate()


def test_pull_to_base_holds_the_weights_near_the_base(small_model_dir, tmp_path):
    base = load_model(small_model_dir).model.state_dict()
    k = base["projection.weight"].size(0)

    def deviation(name: str, **settings) -> float:
        config = FinetuneConfig(epochs=3, lr=0.01, holdout_every=0, threads=1, **settings)
        finetune(small_model_dir, product_corrections()[:8], tmp_path / name, "1.1.0", config, pretrained=None)
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
    finetune(base, product_corrections()[:4], tmp_path / "v2", "1.1.0", FinetuneConfig(epochs=1, holdout_every=0, threads=1), pretrained=None)
    assert load_model(tmp_path / "v2").meta.version == "1.1.0"
