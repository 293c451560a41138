"""The module proxies (zo2tier/model/proxy.py): a model that moves its inputs to a proxied module's weight
device gets the compute device, not meta."""

from __future__ import annotations

import torch
import transformers as tf

import zo2tier
from zo2tier.model.proxy import MetaOn


def test_llama4_moving_its_ids_to_the_embedding_device_gets_the_engines_logits(tmp_path):
    """Llama-4's text model calls ``input_ids.to(self.embed_tokens.weight.device)``: through a proxy whose
    weight is on meta that dropped the ids' values (garbage logits, NaN at times)."""
    torch.manual_seed(0)
    cfg = tf.AutoConfig.for_model("llama4_text", vocab_size=96, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=1,
                                  intermediate_size_mlp=64, head_dim=8, interleave_moe_layer_step=1,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with zo2tier.ZOEngine.from_pretrained(tmp_path / "hf", budget="device=1GiB", disk_dir=tmp_path / "d") as engine:
        assert torch.equal(engine.logits({"input_ids": ids}), want)


def test_a_meta_weight_reports_the_compute_device_and_what_is_computed_from_it_is_plain():
    weight = torch.empty(5, 3, device="meta")
    seen = MetaOn.of(weight, torch.device("cpu"))
    assert seen.device == torch.device("cpu") and seen.shape == (5, 3) and seen.dtype == torch.float32
    assert seen.is_meta and type(seen.T) is torch.Tensor and type(seen.sum(0)) is torch.Tensor
    assert torch.tensor([1, 2]).to(seen.device).tolist() == [1, 2]
