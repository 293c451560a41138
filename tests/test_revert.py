"""ZOEngine.revert_to (undo the updates after a log prefix by appending their inverses) and
ZOEngine.extend_log (a fresh engine plus a run's log is that run)."""

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


@pytest.mark.parametrize(("name", "q"), [("mezo", 1), ("fzoo", 3)])
def test_a_fresh_engine_plus_a_runs_log_is_that_run(name, q, tmp_path):
    """The log carried to a fresh engine (as JSON) gives the run's weights bit for bit, on mixed tiers, and
    the same next step."""
    cfg = zo2tier.MeZOConfig(lr=1e-2 if name == "fzoo" else 1e-3, eps=1e-2, seed=5, estimator=name, n_perturbations=q)
    with _engine(tiny_model("llama"), tmp_path / "a", cfg, spread=True) as run:
        for s in range(4):
            run.step(tiny_batch(seed=s))
        saved = [e.to_json() for e in run.log]
        want = run.state_dict()
        next_want = run.step(tiny_batch(seed=7))
        after = run.state_dict()
    with _engine(tiny_model("llama"), tmp_path / "b", cfg, spread=True) as fresh:
        fresh.extend_log([LogEntry.from_json(row) for row in saved])
        got = fresh.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        nxt = fresh.step(tiny_batch(seed=7))
        assert (nxt.loss_plus, nxt.loss_minus) == (next_want.loss_plus, next_want.loss_minus)
        assert all(torch.equal(fresh.state_dict()[k], after[k]) for k in after)


def test_extend_log_refuses_entries_that_do_not_continue_the_log(tmp_path):
    cfg = zo2tier.MeZOConfig(lr=1e-3)
    with zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, config=cfg) as engine:
        engine.step(tiny_batch())
        with pytest.raises(ValueError, match="would be step 1"):
            engine.extend_log([LogEntry(0, 1, 1.0, 1e-3, 0.0)])
        with pytest.raises(ValueError, match="not finite"):
            engine.extend_log([LogEntry(1, 1, math.nan, math.nan, math.nan)])
        assert len(engine.log) == 1
