"""Readers and writers: CoNLL (2/4 columns, -DOCSTART-, IOB1/IOB2/BIOES), JSONL with character spans,
errors with file and line, and tensorize."""
from __future__ import annotations

import io
import json

import pytest

from ml.data import DataFormatError, read_corpus
from ml.data.conll import read_conll, write_conll
from ml.data.jsonl import read_jsonl, text_to_sentences, write_jsonl
from ml.data.tensorize import tensorize
from ml.data.tokenizer import AlignmentError, Tokenizer, char_spans_to_token_spans
from ml.labels import Span
from ml.vocab import UNK_ID, Vocab, Vocabularies, casing, word_key

CONLL4 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

Paris NNP B-NP B-LOC
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_four_column_conll_with_documents(tmp_path):
    sentences = read_conll(write(tmp_path, "a.txt", CONLL4))
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"], ["Paris"]]
    assert sentences[0].spans == [Span(0, 1, "ORG"), Span(2, 3, "MISC")]
    assert sentences[1].spans == [Span(0, 2, "PER")]
    assert [s.doc_id for s in sentences] == [0, 0, 1]


@pytest.mark.parametrize(
    "tags, scheme",
    [(["I-PER", "I-PER", "B-PER", "O"], "iob1"), (["B-PER", "I-PER", "B-PER", "O"], "iob2"), (["B-PER", "E-PER", "S-PER", "O"], "bioes")],
)
def test_reads_every_scheme_to_the_same_spans(tmp_path, tags, scheme):
    text = "".join(f"w{i} {t}\n" for i, t in enumerate(tags))
    for declared in ("auto", scheme):
        (s,) = read_conll(write(tmp_path, "b.txt", text), declared)
        assert s.spans == [Span(0, 2, "PER"), Span(2, 3, "PER")]


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("a O\nb c d\n", 2, "expected 2 columns"),
        ("a B X O\n\nb O\n", 3, "found 2 columns where earlier lines have 4"),
        ("a O\nb B_PER\n", 2, "malformed tag"),
        ("a O\n\nb O\nc B-PER\nd E-LOC\n", 5, "does not continue"),
        ("\n\n", 1, "no sentences"),
    ],
)
def test_malformed_conll_names_file_line_and_reason(tmp_path, text, line, reason):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(DataFormatError) as e:
        read_conll(path, "auto" if "E-LOC" not in text else "bioes")
    assert e.value.line == line and reason in e.value.reason and str(path) in str(e.value)


def test_iob2_declared_rejects_an_i_start(tmp_path):
    with pytest.raises(DataFormatError, match=r"bad.txt:2: I-PER does not continue"):
        read_conll(write(tmp_path, "bad.txt", "a O\nb I-PER\n"), "iob2")


def test_conll_writer_round_trip(tmp_path):
    sentences = read_conll(write(tmp_path, "a.txt", CONLL4))
    out = io.StringIO()
    write_conll(sentences, out, scheme="bioes")
    again = read_conll(write(tmp_path, "b.txt", out.getvalue()))
    assert [(s.tokens, s.spans, s.doc_id) for s in again] == [(s.tokens, s.spans, s.doc_id) for s in sentences]


def test_jsonl_reader_tokenizes_aligns_and_splits_sentences(tmp_path):
    text = "Angela  Merkel visited\tNew York.  Then she left for Paris!"
    record = {"text": text, "entities": [{"start": 0, "end": 14, "label": "PER"}, {"start": 23, "end": 31, "label": "LOC"}, {"start": 52, "end": 57, "label": "LOC"}]}
    sentences = read_jsonl(write(tmp_path, "a.jsonl", json.dumps(record) + "\n"))
    assert len(sentences) == 2
    first, second = sentences
    assert first.tokens == ["Angela", "Merkel", "visited", "New", "York", "."]
    assert first.spans == [Span(0, 2, "PER"), Span(3, 5, "LOC")]
    assert second.spans == [Span(4, 5, "LOC")]
    for s in sentences:
        assert s.offsets is not None
        for tok, (start, end) in zip(s.tokens, s.offsets, strict=True):
            assert text[start:end] == tok


def test_jsonl_round_trip(tmp_path):
    records = [
        {"text": "Ibrahim Ali flew to Cairo.", "entities": [{"start": 0, "end": 11, "label": "PER"}, {"start": 20, "end": 25, "label": "LOC"}]},
        {"text": "Nothing here.", "entities": []},
    ]
    path = write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    out = io.StringIO()
    write_jsonl(read_jsonl(path), out)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == records


def test_sentence_boundary_inside_an_entity_is_not_used():
    # the sentencizer splits after "Yahoo!", inside the entity: those two sentences stay one
    text = "She joined Yahoo! Inc last year. Then she left."
    assert len(Tokenizer("en").sentences(text)) == 3
    sentences = text_to_sentences(text, [(11, 21, "ORG")])
    assert [s.tokens for s in sentences] == [["She", "joined", "Yahoo", "!", "Inc", "last", "year", "."], ["Then", "she", "left", "."]]
    assert sentences[0].spans == [Span(2, 5, "ORG")]


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{", "invalid JSON"),
        ('{"text": ""}', "non-empty string"),
        ('{"text": "Hi Bob", "entities": [{"start": 3, "end": 9, "label": "PER"}]}', "inside the text"),
        ('{"text": "Hi Bob", "entities": [{"start": 3, "end": 5, "label": "PER"}]}', "splits a token"),
        ('{"text": "Hi Bob", "entities": [{"start": 0, "end": 6, "label": "PER"}, {"start": 3, "end": 6, "label": "PER"}]}', "overlap"),
        ('{"text": "Hi Bob", "entities": [{"start": 3, "end": 6}]}', "start, end and label"),
        ('{"text": "Hi Bob", "tokens": []}', "unknown keys"),
        ('[1, 2]', "JSON object"),
    ],
)
def test_malformed_jsonl_names_line_and_reason(tmp_path, line, reason):
    path = write(tmp_path, "bad.jsonl", '{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataFormatError) as e:
        read_jsonl(path)
    assert e.value.line == 2 and reason in e.value.reason


def test_char_spans_widen_only_when_allowed():
    tokens = Tokenizer("en").tokenize("Hi Bobby!")
    with pytest.raises(AlignmentError, match="splits a token"):
        char_spans_to_token_spans(tokens, [(3, 6, "PER")])
    assert char_spans_to_token_spans(tokens, [(3, 6, "PER")], allow_partial=True) == [Span(1, 2, "PER")]


def test_read_corpus_dispatch_and_missing_file(tmp_path):
    assert read_corpus(write(tmp_path, "a.jsonl", '{"text": "Hi"}\n'))[0].tokens == ["Hi"]
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "nope.txt")


def test_tokenizer_language_is_checked():
    assert Tokenizer("de").tokenize("Die Straße.")[1].text == "Straße"
    with pytest.raises(ValueError, match="no tokenizer for language code 'xx-nope'"):
        Tokenizer("xx-nope")


def test_features_and_tensorize():
    assert word_key("Berlin1990") == "berlin0000"
    assert [casing(t) for t in ["word", "WORD", "Word", "wOrD", "1990", "A4", "--"]] == [1, 2, 3, 4, 5, 6, 7]
    vocab = Vocabularies(Vocab(["the", "berlin"]), Vocab(list("theBrlin")), Vocab(["O", "B-LOC", "I-LOC"], specials=False))
    batch = tensorize([["the", "Berlin"], ["Zzz"]], vocab, max_word_length=4, tags=[["O", "B-LOC"], ["O"]])
    assert batch.words.tolist() == [[vocab.words.index("the"), vocab.words.index("berlin")], [UNK_ID, 0]]
    assert batch.mask.tolist() == [[True, True], [True, False]]
    assert batch.chars.shape == (2, 2, 4)  # "Berlin" is cut to its first 4 characters for the char encoder
    assert batch.tags is not None and batch.tags.tolist() == [[0, 1], [0, 0]]
    with pytest.raises(KeyError, match="B-PER"):
        tensorize([["x"]], vocab, 4, tags=[["B-PER"]])
    with pytest.raises(ValueError, match="1 tokens but 2 tags"):
        tensorize([["x"]], vocab, 4, tags=[["O", "O"]])


def test_a_case_folded_character_table_reads_every_case_as_the_lower_case():
    kelvin = "\u212a"  # KELVIN SIGN: lower-cases to k, but k upper-cases to K
    vocab = Vocabularies.build([["Berlin", "BERLIN", "berlin", kelvin, "ǅ"]], ["O", "S-LOC"], fold_char_case=True)
    assert all(ch == ch.lower() for ch in vocab.chars.itos[2:]), vocab.chars.itos
    assert len(vocab.chars) == 2 + len(set("berlin")) + 2  # k and ǆ, beside the specials
    batch = tensorize([["BERLIN", "Berlin", "berlin", "bErLiN"]], vocab, max_word_length=10)
    assert all(batch.chars[0, i].tolist() == batch.chars[0, 0].tolist() for i in range(4))
    assert batch.cases[0].tolist() == [casing("BERLIN"), casing("Berlin"), casing("berlin"), casing("bErLiN")]
    assert vocab.chars.index(kelvin) == vocab.chars.index("k") == vocab.chars.index("K")
    assert vocab.chars.index("ǅ") == vocab.chars.index("Ǆ") == vocab.chars.index("ǆ")  # title and upper case of a digraph
    assert vocab.chars.index("Z") == UNK_ID  # no z seen
    again = Vocabularies.from_json(json.loads(json.dumps({"words": vocab.words.to_json(), "chars": vocab.chars.to_json(), "tags": vocab.tags.to_json()})))
    assert again.chars.stoi == vocab.chars.stoi and again.chars.itos == vocab.chars.itos and again.chars.fold_case
    plain = Vocabularies.build([["Berlin"]], ["O", "S-LOC"])
    assert "B" in plain.chars.itos and not plain.chars.aliases and "aliases" not in plain.chars.to_json()  # the default is unchanged


def test_vocabulary_aliases_must_point_to_items():
    with pytest.raises(ValueError, match="points to 'q', which is not an item"):
        Vocab(["a"], aliases={"A": "q"})
    with pytest.raises(ValueError, match="alias 'a' is also an item"):
        Vocab(["a", "b"], aliases={"a": "b"})
