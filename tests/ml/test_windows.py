"""Windows shared by training and serving: packing sentences of one text, splitting and stitching
a sentence longer than the window, and the predictor running exactly those windows."""
from __future__ import annotations

import pytest
import torch

from ml.data import Sentence
from ml.labels import Span
from ml.predictor import Predictor
from ml.windows import PieceResult, group_texts, plan, stitch, training_windows
from ml.word_tuning import attach, merge


def _covered(windows, lengths):
    """For every sentence, the tokens its pieces keep, in order."""
    kept: dict[int, list[int]] = {}
    for w in windows:
        for p in w.pieces:
            kept.setdefault(p.sentence, []).extend(range(p.keep_start, p.keep_end))
    return [sorted(kept.get(i, [])) for i in range(len(lengths))]


def test_document_windows_pack_whole_sentences_of_one_text_up_to_the_limit():
    texts = [[5, 6, 4, 10], [3, 3]]
    windows = plan(texts, 12, document=True)
    layout = [[(p.sentence, p.offset, p.end - p.start) for p in w.pieces] for w in windows]
    assert layout == [[(0, 0, 5), (1, 5, 6)], [(2, 0, 4)], [(3, 0, 10)], [(4, 0, 3), (5, 3, 3)]]
    assert all(w.length <= 12 for w in windows)


def test_sentence_windows_hold_one_sentence_each():
    windows = plan([[5, 6], [3]], 12, document=False)
    assert [[p.sentence for p in w.pieces] for w in windows] == [[0], [1], [2]]


@pytest.mark.parametrize("length", [13, 24, 25, 100, 1001])
def test_a_long_sentence_is_split_into_bounded_overlapping_windows_that_own_every_token_once(length):
    lengths = [3, length, 2]
    windows = plan([lengths], 12, document=True)
    assert all(w.length <= 12 for w in windows)
    assert _covered(windows, lengths) == [list(range(n)) for n in lengths]
    split = [w.pieces[0] for w in windows if w.pieces[0].sentence == 1]
    assert len(split) > 1
    for piece in split[1:]:
        assert piece.keep_start - piece.start == 3  # a quarter of the window read before the owned chunk


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="max_tokens"):
        plan([[3]], 0, document=True)
    with pytest.raises(ValueError, match="sentence 1 has no tokens"):
        plan([[3, 0]], 8, document=True)


def test_stitch_takes_an_entity_from_the_piece_that_owns_its_first_token():
    from ml.windows import Piece

    # sentence of 12 tokens, two pieces: [0, 9) owns [0, 6), [3, 12) owns [6, 12)
    first = PieceResult(Piece(0, 0, 9, 0, 0, 6), ["O"] * 5 + ["B-PER", "I-PER", "E-PER", "O"], [0.9] * 9)
    # the second piece sees the entity from its middle (a worse view) and a location of its own
    second = PieceResult(Piece(0, 3, 12, 0, 6, 12), ["O", "O", "O", "S-ORG", "E-PER", "O", "O", "S-LOC", "O"], [0.5] * 9)
    spans, scores, tags = stitch(12, [first, second])
    assert spans == [Span(5, 8, "PER"), Span(10, 11, "LOC")]
    assert tags is None
    assert scores[5:8] == [0.9, 0.9, 0.9] and scores[8] == 0.5 and scores[0] == 0.9


def test_group_texts_and_training_windows():
    assert group_texts([0, 0, 1, None, None, 1]) == [[0, 1], [2], [3], [4], [5]]
    sentences = [
        Sentence(["Anna", "Berg", "said"], [Span(0, 2, "PER")], doc_id=0),
        Sentence(["Berg", "left"], [Span(0, 1, "PER")], doc_id=0),
        Sentence(["in", "New", "York", "today", "and", "then", "Paris"], [Span(1, 3, "LOC"), Span(6, 7, "LOC")], doc_id=1),
    ]
    windows = training_windows(sentences, 6, document=True)
    assert windows[0].tokens == ["Anna", "Berg", "said", "Berg", "left"]
    assert windows[0].spans == [Span(0, 2, "PER"), Span(3, 4, "PER")]
    # the 7-token sentence is split (window 6, margin 1, chunks of 4): [0, 5) and [3, 7)
    assert [w.tokens for w in windows[1:]] == [["in", "New", "York", "today", "and"], ["today", "and", "then", "Paris"]]
    assert windows[1].spans == [Span(1, 3, "LOC")] and windows[2].spans == [Span(3, 4, "LOC")]
    assert [len(w.tokens) for w in training_windows(sentences, 6, document=False)] == [3, 2, 5, 4]


@pytest.fixture(scope="module")
def doc_corpus():
    """Synthetic documents of 8 sentences each."""
    from tests.synthetic import synthetic_corpus

    sentences = synthetic_corpus(160, seed=1)
    for i, s in enumerate(sentences):
        s.doc_id = i // 8
    return sentences


@pytest.fixture(scope="module")
def doc_model_dir(tmp_path_factory, doc_corpus):
    """A small model trained with document context on windows of up to 64 tokens."""
    from ml.train import train
    from tests.conftest import small_config

    out = tmp_path_factory.mktemp("models") / "doc"
    config = small_config(model__context="document", model__window_tokens=64, train__batch_size=2, train__epochs=30)
    result = train(config, doc_corpus, doc_corpus, out, name="doc", version="1.0.0", progress=False, log=lambda m: None)
    assert result.dev.f1 > 0.95, f"the document model did not learn the synthetic documents: dev F1 {result.dev.f1}"
    return out


def _long_sentence(corpus, n_tokens):
    tokens: list[str] = []
    spans: list[Span] = []
    k = 0
    while len(tokens) < n_tokens:
        s = corpus[k % len(corpus)]
        spans.extend(Span(e.start + len(tokens), e.end + len(tokens), e.label) for e in s.spans)
        tokens.extend(s.tokens)
        k += 1
    spans = [e for e in spans if e.end <= n_tokens]
    return tokens[:n_tokens], spans


def test_stitched_prediction_equals_the_single_pass_on_a_sentence_just_under_the_limit(doc_model_dir, doc_corpus):
    predictor = Predictor.load(doc_model_dir)
    assert predictor.window_tokens == 64 and predictor.document
    tokens, gold = _long_sentence(doc_corpus, 250)
    predictor.window_tokens = 256
    (single,) = predictor.predict([tokens])
    predictor.window_tokens = 64  # margin 16, owned chunks of 32 tokens: 7 cuts
    (stitched,) = predictor.predict([tokens])
    assert [tuple(s[:3]) for s in stitched.spans] == [tuple(s[:3]) for s in single.spans]
    assert len(stitched.tags) == len(stitched.scores) == 250
    # entities straddling a cut (a multiple of 32) survive whole
    straddling = {tuple(g) for g in gold if g.start // 32 != (g.end - 1) // 32}
    assert straddling, "the test sentence should have entities across a cut"
    assert straddling <= {tuple(s[:3]) for s in stitched.spans}


def test_a_100000_token_sentence_is_tagged_in_bounded_windows(doc_model_dir, doc_corpus):
    predictor = Predictor.load(doc_model_dir)
    predictor.window_tokens = 256
    widths: list[int] = []
    inner = predictor.model

    class Recording(torch.nn.Module):
        def forward(self, words, chars, cases, mask):
            widths.append(words.size(1))
            return inner(words, chars, cases, mask)

    predictor.model = Recording()  # type: ignore[assignment]
    tokens, gold = _long_sentence(doc_corpus, 100_000)
    (result,) = predictor.predict([tokens], batch_size=256)
    assert max(widths) <= 256 and len(widths) > 1
    assert len(result.tags) == 100_000
    found = {(s.start, s.end, s.label) for s in result.spans}
    assert len(found & {tuple(g) for g in gold}) >= 0.99 * len(gold)


def test_document_context_predicts_texts_sentence_by_sentence_and_a_single_sentence(doc_model_dir, corpus):
    predictor = Predictor.load(doc_model_dir)
    texts = [[s.tokens for s in corpus[:5]], [corpus[5].tokens], [s.tokens for s in corpus[6:9]]]
    together = predictor.predict_texts(texts)
    assert [len(t) for t in together] == [5, 1, 3]
    for text, result in zip(texts, together, strict=True):
        alone = predictor.predict_texts([text])[0]
        assert [[tuple(s[:3]) for s in r.spans] for r in alone] == [[tuple(s[:3]) for s in r.spans] for r in result]
        assert [r.scores for r in alone] == [pytest.approx(r.scores, abs=1e-4) for r in result]
        assert [len(r.tags) for r in result] == [len(s) for s in text]
    (one,) = predictor.predict([corpus[0].tokens])
    assert [tuple(s[:3]) for s in one.spans] == [tuple(e) for e in corpus[0].spans]
    with pytest.raises(TypeError, match="text 0 is a string"):
        predictor.predict_texts(["Anna Berg"])
    with pytest.raises(ValueError, match="sentence 1 has no tokens"):
        predictor.predict_texts([[["a"], []]])


def test_word_correction_trains_only_training_rows_and_merges_exactly():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.word_embedding = torch.nn.Embedding(10, 4, padding_idx=0)
    before = model.word_embedding.weight.detach().clone()
    attach(model, 5)
    ids = torch.tensor([[0, 1, 4, 7, 9]])
    assert torch.equal(model.word_embedding(ids), torch.nn.functional.embedding(ids, before))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model.word_embedding(ids).pow(2).sum().backward()
        optimizer.step()
    trained = model.word_embedding(ids).detach()
    merge(model)
    assert isinstance(model.word_embedding, torch.nn.Embedding)
    assert torch.allclose(model.word_embedding(ids), trained)
    weight = model.word_embedding.weight.detach()
    assert torch.equal(weight[5:], before[5:])  # pretrained-only rows untouched
    assert torch.equal(weight[0], before[0])  # padding row untouched
    assert not torch.allclose(weight[1], before[1]) and not torch.allclose(weight[4], before[4])


def test_final_fit_on_train_plus_dev_keeps_the_last_epoch_and_separates_documents(corpus):
    from ml.train import train
    from ml.windows import with_dev
    from tests.conftest import small_config

    a = [Sentence(["x"], doc_id=0), Sentence(["y"], doc_id=1)]
    b = [Sentence(["z"], doc_id=0), Sentence(["w"], doc_id=None)]
    assert [s.doc_id for s in with_dev(a, b)] == [0, 1, 2, None]
    result = train(small_config(train__fit_dev=True, train__epochs=3), corpus[:40], corpus[40:], None, progress=False, log=lambda m: None)
    assert result.best_epoch == 3 and len(result.history) == 3
