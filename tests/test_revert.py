"""ZOEngine.revert_to: undo the updates after a log prefix by appending their inverses."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import zo2tier
from zo2tier.zo.update import LogEntry, inverse_entries

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}


def _spread(names):
    tiers = ["device", "host", "disk"]
    return {n: tiers[i % 3] for i, n in enumerate(names)}


def _engine(model, tmp_path, cfg, spread):
    names = zo2tier.ZOEngine.block_names(model)
    return zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=cfg,
                            placement=_spread(names) if spread else None)


@pytest.mark.parametrize(("name", "q", "wd"), [("mezo", 1, 0.0), ("fzoo", 3, 0.0), ("mezo", 2, 0.1)])
def test_revert_brings_back_the_prefix_weights(name, q, wd, tmp_path):
    """Two steps, then four more undone: the weights of the two-step run up to fp32 rounding; every tier
    agrees bit for bit with all-on-device; training goes on from there."""
    cfg = zo2tier.MeZOConfig(lr=1e-2 if name == "fzoo" else 1e-3, eps=1e-2, weight_decay=wd, seed=5,
                             estimator=name, n_perturbations=q)
    with _engine(tiny_model("llama"), tmp_path / "a", cfg, spread=False) as ref:
        for s in range(2):
            ref.step(tiny_batch(seed=s))
        want = ref.state_dict()
    states = []
    for spread in (False, True):
        with _engine(tiny_model("llama"), tmp_path / f"b{spread}", cfg, spread) as engine:
            for s in range(6):
                engine.step(tiny_batch(seed=s))
            moved = engine.state_dict()
            assert engine.revert_to(2 * q) == 4 * q
            assert len(engine.log) == 10 * q
            states.append(engine.state_dict())
            engine.step(tiny_batch(seed=9))  # the next step's seeds follow the longer log
            assert engine.log[-1].step == 11 * q - 1
    assert all(torch.equal(states[0][k], states[1][k]) for k in want)  # tiers bit for bit
    far = max(float((moved[k] - want[k]).abs().max()) for k in want)
    assert far > 1e-3  # the four steps did move the weights
    for k in want:
        torch.testing.assert_close(states[0][k], want[k], rtol=1e-5, atol=1e-6)


def test_inverse_entries_formula_and_refusals(tmp_path):
    tail = [LogEntry(3, 11, 2.0, 1e-3, 0.0), LogEntry(4, 12, -1.5, 1e-3, 0.5)]
    inv = inverse_entries(tail, 5)
    assert [(e.step, e.step_seed, e.projected_grad) for e in inv] == [(5, 12, -1.5), (6, 11, 2.0)]
    assert inv[0].lr == -1e-3 / (1 - 1e-3 * 0.5) and inv[1].lr == -1e-3
    with pytest.raises(ValueError, match="folded"):
        inverse_entries([LogEntry(0, 1, math.nan, math.nan, math.nan)], 1)
    with zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, config=zo2tier.MeZOConfig(lr=1e-3)) as engine:
        engine.step(tiny_batch())
        for bad in (-1, 2, 1.0, True):
            with pytest.raises(ValueError, match="n_entries"):
                engine.revert_to(bad)
        assert engine.revert_to(1) == 0 and len(engine.log) == 1
