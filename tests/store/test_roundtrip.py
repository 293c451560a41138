"""convert -> train -> export -> from_pretrained, and checkpoints, give exactly the engine's weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import zo2tier

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}
CFG = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)


def spread(names):
    tiers = ["device", "host", "disk", "disk"]
    return {n: tiers[i % len(tiers)] for i, n in enumerate(names)}


def _hf(tmp_path, arch="llama"):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_convert_train_export_round_trip(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = _hf(tmp_path, arch)
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    names = zo2tier.ZOEngine.block_names(model)
    with zo2tier.ZOEngine.from_pretrained(tmp_path / "store", budget=BIG, config=CFG, placement=spread(names)) as e:
        for _ in range(5):
            e.step(tiny_batch())
        state = e.state_dict()
        e.export(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    zo2tier.export_store(tmp_path / "store", tmp_path / "out2")  # the closed store: same weights
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out2").state_dict()
    for key in state:
        assert torch.equal(again[key], state[key]), key


def test_export_store_applies_pending_updates(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _hf(tmp_path)
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    e = zo2tier.ZOEngine.from_store(tmp_path / "store", budget=BIG, config=CFG,
                                    placement=spread(zo2tier.ZOEngine.block_names(model)))
    for _ in range(4):
        e.step(tiny_batch())
    e.save_checkpoint(tmp_path / "ck")  # device blocks stay at step 0 in the store: 4 pending updates
    state = e.state_dict()
    with open(tmp_path / "store" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["step"] == 4 and len(manifest["log"]) == 4
    e.tiers.close()  # simulate a crash: no close(), just let go of the store
    e.store.close()
    from zo2tier.tiers.store_dir import release_disk_dir

    release_disk_dir(e.disk_dir)
    zo2tier.export_store(tmp_path / "store", tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for key in state:
        assert torch.equal(loaded[key], state[key]), key


def test_checkpoint_is_small_and_resume_continues_exactly(tmp_path):
    model = _hf(tmp_path)
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    place = spread(zo2tier.ZOEngine.block_names(model))
    batches = [tiny_batch(seed=s) for s in range(8)]
    with zo2tier.ZOEngine.from_store(tmp_path / "store", budget=BIG, config=CFG, placement=place) as ref:
        ref_losses = [ref.step(b).loss_plus for b in batches]
        ref_state = ref.state_dict()
    zo2tier.convert(tmp_path / "hf", tmp_path / "store2", progress=False)
    e = zo2tier.ZOEngine.from_store(tmp_path / "store2", budget=BIG, config=CFG, placement=place)
    losses = [e.step(b).loss_plus for b in batches[:5]]
    e.save_checkpoint(tmp_path / "ck", extra_state={"position": 5})
    size = os.path.getsize(tmp_path / "ck" / "checkpoint.json")
    assert size < 8_000, size  # referenced, not copied
    e.close()
    with zo2tier.ZOEngine.resume(tmp_path / "ck") as r:
        assert r.extra_state == {"position": 5}
        losses += [r.step(b).loss_plus for b in batches[5:]]
        state = r.state_dict()
    assert losses == ref_losses
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key


def test_in_memory_engine_checkpoint_writes_its_store_once(tmp_path):
    model = tiny_model("llama")
    e = zo2tier.ZOEngine(model, budget=BIG, config=CFG)  # no disk_dir: every block in memory
    e.step(tiny_batch())
    e.save_checkpoint(tmp_path / "ck")
    assert os.path.exists(tmp_path / "ck" / "store" / "manifest.json")
    e.step(tiny_batch(seed=5))
    state = e.state_dict()
    e.save_checkpoint(tmp_path / "ck", extra_state={"n": 2})
    e.close()
    with zo2tier.ZOEngine.resume(tmp_path / "ck") as r:
        got = r.state_dict()
    for key in state:
        assert torch.equal(state[key], got[key]), key


def test_extra_state_must_be_json(tmp_path):
    with (
        zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, config=CFG) as e,
        pytest.raises(ValueError, match="JSON"),
    ):
        e.save_checkpoint(tmp_path / "ck", extra_state={"t": torch.zeros(1)})
