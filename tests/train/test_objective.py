"""Label-word losses and accuracy: pure math, then accuracy through the tiers on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model
from tiny_task import tiny_rows, tiny_tokenizer

import zo2tier
from zo2tier.train.data import Example, LabelWords, Prompt, collate, encode
from zo2tier.train.job import accuracy
from zo2tier.train.objective import classification_loss, label_word_lm_loss, loss_fn_for, predictions


def _batch():
    return {"pred_pos": torch.tensor([1, 2]), "word_ids": torch.tensor([5, 7]), "targets": torch.tensor([0, 1]),
            "labels": torch.tensor([[-100, -100, 5, -100], [-100, -100, -100, 7]])}


def test_classification_loss_is_cross_entropy_over_label_words():
    logits = torch.zeros(2, 4, 10)
    logits[0, 1, 5], logits[0, 1, 7] = 2.0, 0.0  # row 0: right, by 2
    logits[1, 2, 5], logits[1, 2, 7] = 1.0, 0.0  # row 1: wrong, by 1
    logits[:, :, 0] = 50.0  # other vocabulary must not matter
    expected = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1)))
    assert classification_loss(logits, _batch()) == pytest.approx(expected, rel=1e-6)
    assert predictions(logits, _batch()).tolist() == [0, 0]


def test_lm_loss_reads_only_the_answer_tokens():
    logits = torch.randn(2, 4, 10)
    b = _batch()
    logp = logits.log_softmax(-1)
    expected = -0.5 * (logp[0, 1, 5] + logp[1, 2, 7])
    assert label_word_lm_loss(logits, b) == pytest.approx(float(expected), rel=1e-6)
    assert loss_fn_for("lm") is label_word_lm_loss
    with pytest.raises(ValueError, match="unknown"):
        loss_fn_for("mse")


def test_accuracy_through_the_tiers_matches_the_plain_model(tmp_path):
    tok = tiny_tokenizer()
    prompt = Prompt("{text} It was", LabelWords.parse("positive=great,negative=terrible"))
    data = encode([Example(r["text"], r["label"]) for r in tiny_rows(24)], prompt, tok)
    model = tiny_model("llama")
    with torch.no_grad():  # the reference: plain HF forward on the same batches
        correct = 0
        for start in range(0, 24, 10):
            b = collate(data, range(start, min(start + 10, 24)))
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            correct += int((predictions(logits, b) == b["targets"]).sum())
    names = zo2tier.ZOEngine.block_names(model)
    placement = dict(zip(names, ["device", "host", "disk", "disk"]))
    with zo2tier.ZOEngine(model, budget="device=1GiB,host=1GiB,disk=1GiB", disk_dir=tmp_path,
                          placement=placement) as engine:
        got = accuracy(engine, data, batch_size=10)
    assert got == correct / 24


def test_classification_step_uses_the_loss_hook(tmp_path):
    tok = tiny_tokenizer()
    prompt = Prompt("{text} It was", LabelWords.parse("positive=great,negative=terrible"))
    batch = collate(encode([Example(r["text"], r["label"]) for r in tiny_rows(8)], prompt, tok), range(8))
    model = tiny_model("llama")
    with torch.no_grad():
        ref = classification_loss(model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).logits, batch)
    cfg = zo2tier.MeZOConfig(lr=0.0, eps=1e-3)
    with zo2tier.ZOEngine(model, budget="device=1GiB", config=cfg) as engine:
        r = engine.step(batch, loss_fn=classification_loss)
    assert r.loss_plus != r.loss_minus
    assert 0.5 * (r.loss_plus + r.loss_minus) == pytest.approx(ref, abs=1e-3)
