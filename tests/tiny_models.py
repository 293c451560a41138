"""Tiny random Hugging Face models of several families, built from configs (no downloads)."""

from __future__ import annotations

import torch

ARCHS = ("opt", "llama", "llama_untied", "qwen2", "qwen3", "mistral", "gpt2", "gemma3", "bloom", "mpt")

_COMMON = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_config(arch: str):
    import transformers as tf

    if arch == "opt":
        return tf.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16)
    if arch == "llama":
        return tf.LlamaConfig(**_COMMON, tie_word_embeddings=True)
    if arch == "llama_untied":
        return tf.LlamaConfig(**_COMMON, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if arch == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=8)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=8)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=8)
    if arch == "bloom":  # ALiBi: its bias reaches each layer with a row per sequence and head
        return tf.BloomConfig(vocab_size=96, hidden_size=32, n_layer=4, n_head=4)
    if arch == "mpt":  # ALiBi without a batch dim: (heads, 1, T), as many rows as MeZO's 2 copies of 2 rows
        return tf.MptConfig(vocab_size=96, d_model=32, n_layers=4, n_heads=4, max_seq_len=64)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


def tiny_batch(batch: int = 2, seq: int = 12, vocab: int = 96, seed: int = 1, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad and batch > 1:
        mask[-1, :3] = 0  # left padding on the last row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
