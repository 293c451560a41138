"""Building a model with its parameters on meta keeps its weight tying."""

import pytest
import torch
import transformers as tf

from zo2tier.model.blocks import describe
from zo2tier.model.loading import params_on_meta

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}


@pytest.mark.parametrize(("config", "tied"), [
    (tf.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **SMALL), True),
    (tf.LlamaConfig(intermediate_size=64, tie_word_embeddings=True, **SMALL), True),
    (tf.LlamaConfig(intermediate_size=64, tie_word_embeddings=False, **SMALL), False),
])
def test_meta_build_keeps_tied_heads_tied(config, tied):
    with params_on_meta():
        meta = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    real = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head, embed = meta.get_output_embeddings().weight, meta.get_input_embeddings().weight
    assert head.device.type == "meta" and not head.requires_grad
    assert (head is embed) == tied
    assert describe(meta).aliases == describe(real).aliases  # the engine sees the model the user built
    assert sum(p.numel for p in describe(meta).params) == sum(p.numel for p in describe(real).params)
