"""The tiered engine: offloading is invisible, nothing drifts, and ZO optimizes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_batch, tiny_model

import zo2tier
from zo2tier.zo.rng import step_seed
from zo2tier.zo.update import causal_lm_loss

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}


def spread(engine_blocks):
    tiers = ["device", "host", "disk", "disk"]
    return {b: tiers[i % len(tiers)] for i, b in enumerate(engine_blocks)}


def run(model, tmp_path, placement, steps=5, **kw):
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)
    names = [f"{n}" for n in zo2tier.ZOEngine.block_names(model)]
    place = placement(names) if placement else None
    batch = tiny_batch()
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, device="cpu", config=cfg,
                          placement=place, **kw) as engine:
        results = [engine.step(batch) for _ in range(steps)]
        loss = engine.evaluate(batch)
        state = engine.state_dict()
        placed = dict(engine.placement)
    return results, loss, state, placed


@pytest.mark.parametrize("arch", ARCHS)
def test_tiers_match_all_on_device(arch, tmp_path):
    ref = run(tiny_model(arch), tmp_path / "a", None)
    got = run(tiny_model(arch), tmp_path / "b", spread)
    assert set(got[3].values()) == {"device", "host", "disk"}
    assert set(ref[3].values()) == {"device"}
    for r, g in zip(ref[0], got[0]):
        assert (r.loss_plus, r.loss_minus, r.projected_grad) == (g.loss_plus, g.loss_minus, g.projected_grad)
    assert ref[1] == got[1]
    assert ref[2].keys() == got[2].keys()
    for key in ref[2]:
        assert torch.equal(ref[2][key], got[2][key]), key


def test_state_dict_keys_and_shapes_match_model(tmp_path):
    model = tiny_model("opt")
    expected = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    _, _, state, _ = run(model, tmp_path, spread, steps=1)
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == expected


def test_lr_zero_is_bit_identical(tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = zo2tier.MeZOConfig(lr=0.0, eps=1e-3, seed=0)
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=cfg,
                          placement=spread(zo2tier.ZOEngine.block_names(model))) as engine:
        for _ in range(10):
            engine.step(tiny_batch())
        after = engine.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_zo_lowers_the_loss(tmp_path):
    model = tiny_model("llama", seed=5)
    batch = tiny_batch(batch=4, seq=16)
    cfg = zo2tier.MeZOConfig(lr=3e-3, eps=1e-3, seed=0)
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=cfg,
                          placement=spread(zo2tier.ZOEngine.block_names(model))) as engine:
        start = engine.evaluate(batch)
        for _ in range(300):
            engine.step(batch)
        end = engine.evaluate(batch)
    assert end < start - 0.1, (start, end)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_perturbed_losses_match_two_pass_reference(arch, tmp_path):
    from zo2tier.zo.rng import normal

    model = tiny_model(arch)
    reference = tiny_model(arch)
    batch = tiny_batch()
    cfg = zo2tier.MeZOConfig(lr=0.0, eps=1e-2, seed=11)
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=cfg,
                          placement=spread(zo2tier.ZOEngine.block_names(model))) as engine:
        r = engine.step(batch)
        ids = engine.layout.params
    seed = step_seed(11, 0)
    named = dict(reference.named_parameters())
    clean = {n: p.detach().clone() for n, p in named.items()}
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            for spec in ids:
                z = normal(seed, spec.param_id, spec.numel).view(spec.shape)
                named[spec.name].copy_(clean[spec.name] + sign * 1e-2 * z)
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
        losses.append(causal_lm_loss(logits, batch["labels"]))
    assert r.loss_plus == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    assert r.loss_minus == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


def test_unsupported_models_get_a_clear_error(tmp_path):
    class NoLayers(torch.nn.Module):  # looks like a model (config, forward) but has no decoder layer list
        def __init__(self):
            super().__init__()
            self.config = object()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(zo2tier.UnsupportedModelError, match="NoLayers.*no single decoder layer list"):
        zo2tier.ZOEngine(NoLayers(), budget=BIG, disk_dir=tmp_path / "a")
    with pytest.raises(zo2tier.UnsupportedModelError, match="Linear is not a transformers PreTrainedModel"):
        zo2tier.ZOEngine(torch.nn.Linear(4, 4), budget=BIG, disk_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_int8_chunked_encoding_is_invisible(tmp_path, monkeypatch):
    """Hidden 128 (every slot 128-aligned), int8 on every tier: encoding in small chunks changes no bit,
    in the step's write-backs and in flush()."""
    import transformers as tf

    from zo2tier.tiers import codec

    config = tf.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)
    outs = []
    for chunk in [1 << 62, 3 * codec.INT8_GROUP]:  # chunking off, then many chunks per block
        monkeypatch.setattr(codec, "ENCODE_CHUNK_NUMEL", chunk)
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path / str(chunk), device="cpu", config=cfg,
                              placement=spread(zo2tier.ZOEngine.block_names(model)),
                              storage={t: "int8" for t in ("device", "host", "disk")},
                              write_back_every=3) as engine:
            results = [engine.step(tiny_batch()) for _ in range(4)]
            before = engine.state_dict()
            engine.flush()  # every block with pending updates is re-encoded
            assert all(r.applied_steps == len(engine.log) for r in engine.table)
            outs.append((results, before, engine.state_dict(), set(engine.placement.values())))
    ref, got = outs
    assert got[3] == {"device", "host", "disk"}
    assert [(r.loss_plus, r.projected_grad) for r in ref[0]] == [(g.loss_plus, g.projected_grad) for g in got[0]]
    for a, b in [(ref[1], got[1]), (ref[2], got[2])]:
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("lookahead", "k", "slots"), [(None, 1, 2), (None, 4, 2), (0, 4, 1), (3, 1, 4)])
def test_upload_slots_are_two_unless_lookahead_is_given(lookahead, k, slots, tmp_path):
    """Host-tier upload slots (CUDA) are lookahead + 1; by default 2, whatever the write-back interval (a
    block goes down part by part while the next comes up). The planner counts the same number."""
    model = tiny_model("opt")
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, placement=spread(zo2tier.ZOEngine.block_names(model)),
                          write_back_every=k, lookahead_blocks=lookahead) as engine:
        assert engine.tiers.upload_slots == slots
        assert engine.tiers.lookahead_blocks == (2 if lookahead is None else lookahead)  # disk reads
        assert engine.host_lookahead + 1 == slots
