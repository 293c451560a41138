"""The one name resolver of every loader (zo2tier/model/names.py): transformers' load-time renamings are
followed, tensors it merges (MoE experts) are merged by its own converters, a missing tensor names itself."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import zo2tier
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


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_saved_apart_are_merged_as_transformers_loads_them(tmp_path, arch):
    """A MoE checkpoint keeps each expert's w1/w2/w3 apart; the model has one gate_up_proj / down_proj per layer.
    The folder and its store load as transformers loads them: 12 experts, so expert 10 must follow expert 9."""
    torch.manual_seed(0)
    if arch == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=12))
    else:
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**SMALL, num_key_value_heads=2, num_experts=12,
                                                         moe_intermediate_size=16, head_dim=8))
    hf = _saved(tmp_path, model)
    from safetensors import safe_open

    with safe_open(f"{hf}/model.safetensors", "pt") as f:
        assert not any("gate_up_proj" in k for k in f.keys())  # noqa: SIM118 - saved apart
    loaded = type(model).from_pretrained(hf).eval()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = loaded(input_ids=ids).logits
    convert(hf, str(tmp_path / "store"), progress=False)
    for source in (hf, str(tmp_path / "store")):
        with zo2tier.ZOEngine.from_pretrained(source, budget="device=1GiB", disk_dir=tmp_path / "d") as engine:
            state = engine.state_dict()
            assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items() if k in state), source
            assert torch.equal(engine.logits({"input_ids": ids}), want), source


def test_a_missing_tensor_is_named_when_the_resolver_is_bound():
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, tie_word_embeddings=False))
    keys = {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
    with pytest.raises(ValueError, match=r"no tensor for parameter 'lm_head\.weight' of LlamaForCausalLM"):
        name_resolver(model)(keys)
    stripped = {k.removeprefix("model.") for k, _ in model.named_parameters()}  # saved without the base prefix
    assert name_resolver(model)(stripped)("model.norm.weight") == "norm.weight"

