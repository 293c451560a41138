"""A tiny sentiment task to smoke-test an install: a random 4-layer Llama, a word-level tokenizer, CSVs.

Example::

    from zo2tier.train.tiny import write_tiny_task
    paths = write_tiny_task("runs/tiny")  # {'model': ..., 'train': ..., 'test': ...}
"""

from __future__ import annotations

import csv
import os
import random

POSITIVE = ["good", "nice", "happy", "love", "fine", "fun", "bright", "warm"]
NEGATIVE = ["bad", "awful", "sad", "hate", "dull", "boring", "dark", "cold"]
NEUTRAL = ["film", "day", "car", "phone", "song", "book", "the", "a", "is", "very", "so", "this"]
EXTRA = ["It", "was", "great", "terrible", "positive", "negative", "Sentiment:"]


def tiny_tokenizer():
    """A whitespace word-level tokenizer (0 = [PAD], 1 = [UNK]) with fewer than 96 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in POSITIVE + NEGATIVE + NEUTRAL + EXTRA:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def tiny_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` alternating positive/negative rows of five words each."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2) + rng.sample(NEUTRAL, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: str, rows: list[dict[str, str]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def write_tiny_task(out_dir: str, *, n_train: int = 64, n_test: int = 16, seed: int = 0) -> dict[str, str]:
    """Write ``model/`` (random tiny Llama + tokenizer), ``train.csv`` and ``test.csv``; returns their paths."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model_dir = os.path.join(out_dir, "model")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return {"model": model_dir,
            "train": write_csv(os.path.join(out_dir, "train.csv"), tiny_rows(n_train, seed)),
            "test": write_csv(os.path.join(out_dir, "test.csv"), tiny_rows(n_test, seed + 1))}
