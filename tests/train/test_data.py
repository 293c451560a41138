"""The data pipeline: loading, label words, templates, dedup, balanced seeded splits, batches."""

from __future__ import annotations

import json

import pytest
from tiny_task import tiny_rows, tiny_tokenizer, write_csv

from zo2tier.train.data import (
    Example,
    LabelWords,
    Prompt,
    balanced_splits,
    batch_indices,
    collate,
    dedup,
    encode,
    keep_labels,
    load_examples,
)


def test_label_words_parse_and_errors():
    lw = LabelWords.parse("positive=great, negative=terrible")
    assert lw.labels == ("positive", "negative") and lw.words == ("great", "terrible")
    assert lw.index("negative") == 1
    with pytest.raises(ValueError, match="needs '='"):
        LabelWords.parse("positive:great")
    with pytest.raises(ValueError, match="fewer than 2"):
        LabelWords.parse("positive=great")
    with pytest.raises(ValueError, match="distinct"):
        LabelWords.parse("a=x,b=x")


def test_template_renders_and_checks():
    p = Prompt("{text} It was", LabelWords.parse("positive=great,negative=terrible"))
    assert p.render("a fine film") == "a fine film It was"
    assert p.answer(1) == " terrible"
    with pytest.raises(ValueError, match="no '\\{text\\}' slot"):
        Prompt("It was", p.label_words)
    with pytest.raises(ValueError, match="not a valid format string"):
        Prompt("{text} {other}", p.label_words)


def test_load_csv_and_jsonl(tmp_path):
    rows = tiny_rows(6)
    csv_path = write_csv(str(tmp_path / "d.csv"), rows)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": r["text"], "y": r["label"]}) for r in rows) + "\n")
    a = load_examples(csv_path)
    b = load_examples(jsonl, text_column="sentence", label_column="y")
    assert a == b == [Example(r["text"], r["label"]) for r in rows]
    with pytest.raises(ValueError, match="no column"):
        load_examples(csv_path, text_column="sentence")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="extension"):
        load_examples(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "missing.csv")


def test_json_lists_bom_csvs_and_json_spellings_load(tmp_path):
    """A .json list of objects loads as JSONL does; a UTF-8 CSV with a byte-order mark (Excel's) loads without
    --encoding; JSON true/false labels keep their JSON spelling; a row that is not an object is one clear error."""
    rows = [{"text": "good film", "label": True}, {"text": "bad day", "label": False}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text("\n".join(map(json.dumps, rows)))
    want = [Example("good film", "true"), Example("bad day", "false")]
    assert load_examples(tmp_path / "a.json") == load_examples(tmp_path / "b.json") == want
    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\ngood film,positive\n".encode())
    assert load_examples(tmp_path / "bom.csv") == [Example("good film", "positive")]
    (tmp_path / "scalar.jsonl").write_text('{"text": "a", "label": "x"}\n"just text"\n')
    with pytest.raises(ValueError, match="row 2 is a JSON str"):
        load_examples(tmp_path / "scalar.jsonl")
    (tmp_path / "numbers.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="row 1 is a JSON int"):
        load_examples(tmp_path / "numbers.json")
    (tmp_path / "broken.json").write_text('[{"text": "a"')
    with pytest.raises(ValueError, match="is not a JSON list"):
        load_examples(tmp_path / "broken.json")


def _prepending_tokenizer():
    """A Llama-2-style SentencePiece BPE: its normalizer prepends "▁" to every input and turns spaces into "▁",
    so " great" alone is ["▁", "▁great"] while "... was great" ends in "▁great"."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for c in "abcdefghijklmnopqrstuvwxyzI":
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in ("great", "terrible", "It", "was", "good", "film", "x"):
        piece = "▁"
        for c in word:
            merges.append((piece, c))
            piece += c
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_label_words_are_tokenized_as_they_follow_the_prompt():
    tok = _prepending_tokenizer()
    assert tok.convert_ids_to_tokens(tok(" great", add_special_tokens=False)["input_ids"]) == ["▁", "▁great"]
    prompt = Prompt("{text} It was", LabelWords.parse("positive=great,negative=terrible"))
    data = encode([Example("good film", "positive")], prompt, tok)
    assert tok.convert_ids_to_tokens(list(data.word_ids)) == ["▁great", "▁terrible"]
    assert tok.convert_ids_to_tokens(list(data.prompt_ids[0] + data.answer_ids[0])) == [
        "▁good", "▁film", "▁It", "▁was", "▁great"]  # the tokens of the whole text, as the model reads it


def test_dedup_keeps_first_and_drops_conflicting():
    data = [Example("a", "positive"), Example("b", "negative"), Example("a", "positive"),
            Example("c", "positive"), Example("c", "negative")]
    assert dedup(data) == [Example("a", "positive"), Example("b", "negative")]


def test_balanced_splits_are_balanced_disjoint_and_seeded():
    data = [Example(f"p{i}", "positive") for i in range(30)] + [Example(f"n{i}", "negative") for i in range(50)]
    data += [Example(f"u{i}", "neutral") for i in range(10)]
    data = keep_labels(data, ["positive", "negative"])
    splits = balanced_splits(data, [10, 10, 20], ["positive", "negative"], seed=0)
    for split, size in zip(splits, [10, 10, 20]):
        assert len(split) == size
        assert sum(ex.label == "positive" for ex in split) == size // 2
    texts = [ex.text for s in splits for ex in s]
    assert len(texts) == len(set(texts))
    assert splits == balanced_splits(data, [10, 10, 20], ["positive", "negative"], seed=0)
    assert splits != balanced_splits(data, [10, 10, 20], ["positive", "negative"], seed=1)
    with pytest.raises(ValueError, match="need"):
        balanced_splits(data, [40, 40], ["positive", "negative"], seed=0)
    with pytest.raises(ValueError, match="multiple of 2"):
        balanced_splits(data, [3], ["positive", "negative"], seed=0)


def test_encode_and_collate_mark_the_answer():
    tok = tiny_tokenizer()
    prompt = Prompt("{text} It was", LabelWords.parse("positive=great,negative=terrible"))
    data = encode([Example("good film", "positive"), Example("very bad dull day", "negative")], prompt, tok)
    great, terrible = tok.convert_tokens_to_ids(["great", "terrible"])
    assert data.word_ids == (great, terrible)
    batch = collate(data, [0, 1])
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["pred_pos"]
    assert ids.shape == (2, 7)  # 'very bad dull day It was terrible'
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 2  # right padding
    assert pos.tolist() == [3, 5]
    assert ids[0, 4] == great and ids[1, 6] == terrible
    assert (labels != -100).sum() == 2 and labels[0, 4] == great and labels[1, 6] == terrible
    assert batch["targets"].tolist() == [0, 1]


def test_encode_truncates_the_start_of_the_text():
    tok = tiny_tokenizer()
    prompt = Prompt("{text} It was", LabelWords.parse("positive=great,negative=terrible"))
    data = encode([Example("the the the the the the good", "positive")], prompt, tok, max_length=5)
    assert tok.convert_ids_to_tokens(list(data.prompt_ids[0])) == ["the", "good", "It", "was"]
    with pytest.raises(ValueError, match="same token"):
        encode([], Prompt("{text}", LabelWords.parse("a=great film,b=great day")), tok)


def test_batch_indices_cover_each_epoch_and_depend_only_on_step():
    seen = [i for step in range(5) for i in batch_indices(20, 4, step, seed=3)]
    assert sorted(seen) == list(range(20))
    assert batch_indices(20, 4, 7, seed=3) == batch_indices(20, 4, 7, seed=3)
    assert batch_indices(20, 4, 5, seed=3) != batch_indices(20, 4, 0, seed=3)
    with pytest.raises(ValueError, match="exceeds"):
        batch_indices(3, 4, 0, seed=0)
