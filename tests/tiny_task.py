"""The tiny sentiment task of zo2tier.train.tiny, plus a saved model of any tiny architecture."""

from __future__ import annotations

from tiny_models import tiny_model

from zo2tier.train.tiny import tiny_rows, tiny_tokenizer, write_csv  # noqa: F401


def save_tiny_model(path: str, arch: str = "llama", seed: int = 0) -> str:
    """A tiny random model and its tokenizer as a Hugging Face directory (safetensors)."""
    tiny_model(arch, seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
