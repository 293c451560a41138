"""The one name resolver of every loader (zo2tier/model/names.py): transformers' load-time renamings are
followed, merges are refused up front with one line, a missing tensor names itself."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import zo2tier
from zo2tier.model.blocks import UnsupportedModelError
from zo2tier.model.names import name_resolver
from zo2tier.store.convert import convert

SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4}


def _saved(tmp_path, model):
    model.save_pretrained(tmp_path / "hf")
    return str(tmp_path / "hf")


def test_gpt_neox_head_saved_as_embed_out_loads_from_the_folder_and_the_store(tmp_path):
    torch.manual_seed(0)
    model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL)).eval()
    hf = _saved(tmp_path, model)
    from safetensors import safe_open

    with safe_open(f"{hf}/model.safetensors", "pt") as f:
        assert "embed_out.weight" in f.keys() and "lm_head.weight" not in f.keys()  # noqa: SIM118
    convert(hf, str(tmp_path / "store"), progress=False)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for source in (hf, str(tmp_path / "store")):
        with zo2tier.ZOEngine.from_pretrained(source, budget="device=1GiB", disk_dir=tmp_path / "d") as engine:
            state = engine.state_dict()
            assert torch.equal(state["lm_head.weight"], model.lm_head.weight), source
            assert torch.equal(engine.logits({"input_ids": ids}), want), source


def test_mixtral_experts_saved_apart_are_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=2))
    hf = _saved(tmp_path, model)
    with pytest.raises(UnsupportedModelError, match=r"MixtralForCausalLM: parameter 'model\.layers\.0\.mlp\.experts"
                                                    r"\.gate_up_proj' is saved as 4 tensors .* cannot convert them yet"):
        convert(hf, str(tmp_path / "store"), progress=False)
    assert not (tmp_path / "store").exists()


def test_a_missing_tensor_is_named_when_the_resolver_is_bound():
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, tie_word_embeddings=False))
    keys = {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
    with pytest.raises(ValueError, match=r"no tensor for parameter 'lm_head\.weight' of LlamaForCausalLM"):
        name_resolver(model)(keys)
    stripped = {k.removeprefix("model.") for k, _ in model.named_parameters()}  # saved without the base prefix
    assert name_resolver(model)(stripped)("model.norm.weight") == "norm.weight"

