"""Model shapes and the page-cache drop that the benchmark scripts share."""

from __future__ import annotations

import os

SHAPES = {  # hidden, ffn, layers, heads (OPT); Llama shapes add kv heads = heads
    "opt-125m": (768, 3072, 12, 12),
    "opt-350m": (1024, 4096, 24, 16),
    "opt-1.3b": (2048, 8192, 24, 32),
    "opt-2.7b": (2560, 10240, 32, 32),
    "opt-6.7b": (4096, 16384, 32, 32),
    "opt-13b": (5120, 20480, 40, 40),
    "opt-30b": (7168, 28672, 48, 56),
    "opt-66b": (9216, 36864, 64, 72),
    "opt-175b": (12288, 49152, 96, 96),
    "llama-7b": (4096, 11008, 32, 32),
    "llama-13b": (5120, 13824, 40, 40),
}


def model_config(name: str):
    """A transformers config of the real shape ``name`` (random init is up to the caller)."""
    import transformers as tf

    hidden, ffn, layers, heads = SHAPES[name]
    if name.startswith("opt"):
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                            word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048)
    return tf.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                          max_position_embeddings=4096, tie_word_embeddings=False)


def drop_page_cache(files: list[str] = ()) -> str:
    """Empty the page cache (all of it if permitted, else ``files`` one by one); returns the method used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise_dontneed" if files else "none"
