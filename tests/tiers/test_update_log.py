"""The update log: deferred write-back equals immediate write-back, lr=0 never changes a stored byte,
and the write-back cadence (every K steps, staggered, capped by max_log) holds."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import zo2tier
from zo2tier.tiers.write_back import resolve_write_back

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}


def _spread(names):
    tiers = ["device", "host", "disk", "host", "disk"]
    return {b: tiers[i % len(tiers)] for i, b in enumerate(names)}


def _engine(tmp_path, *, lr=1e-3, model_seed=0, **kw):
    model = tiny_model("llama", seed=model_seed)
    cfg = zo2tier.MeZOConfig(lr=lr, eps=1e-3, weight_decay=0.01, seed=3)
    return zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, device="cpu", config=cfg,
                            placement=_spread(zo2tier.ZOEngine.block_names(model)), **kw)


def _stored(engine) -> dict[str, bytes]:
    """Every block's stored bytes, as its tier holds them (disk blocks: the file)."""
    engine.tiers.drain()
    out = {}
    for r in engine.table:
        if r.tier == "disk":
            with open(r.path, "rb") as f:
                out[r.name] = f.read()[: r.stored_bytes]
        else:
            out[r.name] = r.data.cpu().numpy().tobytes()
    return out


def test_deferred_write_back_equals_immediate(tmp_path):
    batch = tiny_batch()
    runs = []
    for k in (1, 8):
        with _engine(tmp_path / f"k{k}", write_back_every=k) as engine:
            assert set(engine.placement.values()) == {"device", "host", "disk"}
            losses = [(r.loss_plus, r.loss_minus) for r in (engine.step(batch) for _ in range(20))]
            runs.append((losses, engine.evaluate(batch), engine.state_dict(), engine.tiers.bytes_written))
    (ref_losses, ref_eval, ref_state, ref_written), (losses, ev, state, written) = runs
    assert losses == ref_losses and ev == ref_eval
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key
    assert written < ref_written / 4  # the deferred run really skipped write-backs


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_lr_zero_leaves_stored_bytes_unchanged(tmp_path, dtype):
    storage = {"device": dtype, "host": dtype, "disk": dtype}
    with _engine(tmp_path, lr=0.0, storage=storage, write_back_every=2) as engine:
        before = _stored(engine)
        for _ in range(4):
            engine.step(tiny_batch())
        engine.flush()  # every block written back at least twice by now
        assert engine.tiers.bytes_written > 0
        assert all(r.applied_steps == 4 for r in engine.table)
        assert _stored(engine) == before


def test_int8_training_rewrites_with_kept_scales(tmp_path):
    """A trained int8 block, decoded and re-encoded by flush with nothing pending, keeps its bytes."""
    with _engine(tmp_path, storage={"host": "int8", "disk": "int8"}, write_back_every=3) as engine:
        for _ in range(4):
            engine.step(tiny_batch())
        engine.flush()
        before = _stored(engine)
        engine.config = zo2tier.MeZOConfig(lr=0.0, eps=1e-3, seed=3)
        for _ in range(3):
            engine.step(tiny_batch())
        engine.flush()
        assert _stored(engine) == before


def test_write_back_every_k_staggered_and_max_log(tmp_path):
    with _engine(tmp_path, write_back_every=4) as engine:
        movable = [r for r in engine.table if r.tier in ("host", "disk")]
        lags = []
        for _ in range(9):
            engine.step(tiny_batch())
            engine.tiers.drain()  # a disk write-back counts as applied once it is seen to succeed
            lags.append([len(engine.log) - r.applied_steps for r in movable])
        assert max(max(row) for row in lags) <= 4
        assert len({row[0] for row in lags[4:]}) == 4  # each block cycles through its K phases ...
        assert len({tuple(row) for row in lags[4:8]}) == 4 and lags[4] != [lags[4][0]] * len(movable)  # ... staggered
    with _engine(tmp_path, write_back_every=100, max_log=3) as engine:
        for _ in range(5):
            engine.step(tiny_batch())
            engine.tiers.drain()
            assert all(len(engine.log) - r.applied_steps <= 3 for r in engine.table if r.tier != "device")  # 5 steps: without the cap the lag would reach 5


def test_write_back_every_validation():
    cpu = torch.device("cpu")
    assert resolve_write_back(8, cpu) == {"host": 8, "disk": 8}
    assert resolve_write_back({"disk": 16}, torch.device("cuda"))["disk"] == 16
    assert resolve_write_back(None, torch.device("cuda"), {"host": "int8", "disk": "int8"}) == {"host": 8, "disk": 16}
    assert resolve_write_back(None, torch.device("cuda"), {"host": "fp16"})["host"] == 4
    for bad in (0, True, 1.5, {"device": 2}, {"disk": 0}):
        with pytest.raises(ValueError, match="write_back_every"):
            resolve_write_back(bad, cpu)
    with pytest.raises(ValueError, match="max_log"):
        _engine(os.devnull, max_log=0)
