"""Estimators through the engine (q perturbations per block residency): a brute-force torch reference,
tiers bit-identical to all-on-device, no drift at lr = 0, exact replay through checkpoint/resume/export.

The reference runs every copy of the batch on its own, with ``torch.func.functional_call`` on a deep copy
of the model and θ ± ε·z_k built by the same kernels the engine uses (``zo2tier.zo.kernels``), then applies
the engine's logged update with ``apply_update_``: the weights must match bit for bit, the losses and
projected gradients to float tolerance (the engine runs the copies stacked in one forward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHS, tiny_batch, tiny_model
from torch.func import functional_call

import zo2tier
from zo2tier.zo.estimators import make_estimator
from zo2tier.zo.kernels import apply_update_, perturb_into
from zo2tier.zo.rng import step_seed
from zo2tier.zo.update import causal_lm_loss

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}
# (estimator, q, lr): fzoo's lr is a step in weight units (normalised), mezo's multiplies g
CASES = [("mezo", 1, 1e-3), ("mezo", 3, 1e-3), ("fzoo", 3, 1e-3), ("fzoo", 2, 1e-3), ("fzoo-ema", 3, 1e-3),
         ("fzoo-ema", 1, 1e-3)]
ALL_Q3 = [("mezo", 3, 1e-3), ("fzoo", 3, 1e-3), ("fzoo-ema", 3, 1e-3)]


def spread(names):
    tiers = ["device", "host", "disk", "disk"]
    return {n: tiers[i % len(tiers)] for i, n in enumerate(names)}


def _config(name, q, lr, eps=1e-2, wd=0.01, seed=3):
    return zo2tier.MeZOConfig(lr=lr, eps=eps, weight_decay=wd, seed=seed, estimator=name, n_perturbations=q)


def _batches(n):
    return [tiny_batch(seed=s) for s in range(n)]


def _reference(model, specs, aliases, cfg, batches, engine_log):
    """Brute force: each copy's loss from its own forward; the engine's log entries applied to θ."""
    est = make_estimator(cfg.estimator, cfg.n_perturbations)
    q = cfg.n_perturbations
    theta = {s.name: dict(model.named_parameters())[s.name].detach().reshape(-1).clone() for s in specs}
    estimates = []
    for t, batch in enumerate(batches):
        start = t * q
        seeds = [step_seed(cfg.seed, start + k) for k in range(q)]
        losses = []
        for group in est.groups():
            weights = {}
            for s in specs:
                w = theta[s.name]
                if group.k is not None:
                    w = perturb_into(w, torch.empty_like(w), step_seed=seeds[group.k], param_id=s.param_id,
                                     scale=group.sign * cfg.eps, kind=cfg.perturbation)
                weights[s.name] = w.view(s.shape)
            for alias, canonical in aliases.items():
                weights[alias] = weights[canonical]
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            logits = functional_call(model, weights, (), kwargs).logits  # (B, T, V)
            losses.append(causal_lm_loss(logits, batch["labels"]))
        estimates.append((losses, est.estimate(losses, start=start, seeds=seeds, eps=cfg.eps, lr=cfg.lr,
                                               weight_decay=cfg.weight_decay)))
        for entry in engine_log[start : start + q]:  # the update, with the engine's g: same arithmetic
            if entry.lr == 0.0:
                continue
            for s in specs:
                apply_update_(theta[s.name], step_seed=entry.step_seed, param_id=s.param_id, lr=entry.lr,
                              projected_grad=entry.projected_grad,
                              weight_decay=entry.weight_decay if s.decay else 0.0, kind=cfg.perturbation)
    return estimates, theta


@pytest.mark.parametrize(("name", "q", "lr", "arch"),
                         [(*case, "llama") for case in CASES] + [("fzoo", 3, 1e-3, a) for a in ARCHS if a != "llama"]
                         + [("mezo", 1, 1e-3, a) for a in ARCHS if a != "llama"])  # 2 copies x 2 rows = 4 heads
def test_engine_matches_brute_force_reference(name, q, lr, arch, tmp_path):
    """Every estimator on llama; FZOO's four stacked copies on every architecture (each layer must give each
    copy its own rows of every batch-major input: hidden states, masks, flattened tokens, ALiBi's heads, and
    leave whole what has no batch even where its rows number the copies' rows, as MPT's ALiBi does at B = 2)."""
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    cfg = _config(name, q, lr)
    batches = _batches(3)
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=cfg,
                          placement=spread(zo2tier.ZOEngine.block_names(model))) as engine:
        results = [engine.step(b) for b in batches]
        log = list(engine.log)
        state = engine.state_dict()
        specs, aliases = engine.layout.params, engine.layout.aliases
    assert len(log) == 3 * q
    estimates, theta = _reference(reference, specs, aliases, cfg, batches, log)
    for t, (r, (losses, want)) in enumerate(zip(results, estimates)):
        assert r.loss_plus == pytest.approx(want.loss_plus, rel=1e-6), t
        assert r.loss_minus == pytest.approx(want.loss_minus, rel=1e-6), t
        got = log[t * q : (t + 1) * q]
        assert [(e.step, e.step_seed, e.lr, e.weight_decay) for e in got] == \
            [(e.step, e.step_seed, e.lr, e.weight_decay) for e in want.entries], t
        assert [e.projected_grad for e in got] == pytest.approx([e.projected_grad for e in want.entries],
                                                                rel=1e-4, abs=1e-3), (t, losses)
        assert r.projected_grad == pytest.approx(want.projected_grad, rel=1e-4, abs=1e-3)
    for s in specs:
        assert torch.equal(state[s.name], theta[s.name].view(s.shape)), s.name
    for alias, canonical in aliases.items():
        assert torch.equal(state[alias], state[canonical]), alias


def test_mezo_q1_is_the_two_pass_formula(tmp_path):
    """q = 1 logs g = (L+ − L−)/(2ε) with the full lr, exactly as MeZO-SGD did before estimators."""
    model = tiny_model("llama")
    cfg = _config("mezo", 1, 1e-3)
    with zo2tier.ZOEngine(model, budget=BIG, config=cfg) as engine:
        r = engine.step(tiny_batch())
        (entry,) = engine.log
    assert entry.projected_grad == (r.loss_plus - r.loss_minus) / (2 * cfg.eps) == r.projected_grad
    assert (entry.step, entry.step_seed, entry.lr, entry.weight_decay) == (0, step_seed(3, 0), 1e-3, 0.01)


def _run(model, tmp_path, placement, cfg, steps=4):
    names = zo2tier.ZOEngine.block_names(model)
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=cfg,
                          placement=placement(names) if placement else None) as engine:
        results = [engine.step(b) for b in _batches(steps)]
        return results, list(engine.log), engine.evaluate(tiny_batch()), engine.state_dict(), \
            set(engine.placement.values())


@pytest.mark.parametrize(("name", "q", "lr"), ALL_Q3)
def test_tiers_match_all_on_device(name, q, lr, tmp_path):
    cfg = _config(name, q, lr)
    ref = _run(tiny_model("llama"), tmp_path / "a", None, cfg)
    got = _run(tiny_model("llama"), tmp_path / "b", spread, cfg)
    assert ref[4] == {"device"} and got[4] == {"device", "host", "disk"}
    assert [(r.loss_plus, r.loss_minus, r.projected_grad) for r in ref[0]] == \
        [(r.loss_plus, r.loss_minus, r.projected_grad) for r in got[0]]
    assert ref[1] == got[1] and ref[2] == got[2]
    for key in ref[3]:
        assert torch.equal(ref[3][key], got[3][key]), key


@pytest.mark.parametrize(("name", "q"), [("mezo", 3), ("fzoo", 3), ("fzoo-ema", 3)])
def test_lr_zero_does_not_drift(name, q, tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, log, _, after, _ = _run(model, tmp_path, spread, _config(name, q, 0.0), steps=5)
    assert len(log) == 5 * q and all(e.lr == 0.0 for e in log)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


@pytest.mark.parametrize(("name", "q", "lr"), ALL_Q3)
def test_checkpoint_resume_and_export_replay_exactly(name, q, lr, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    cfg = _config(name, q, lr)
    place = spread(zo2tier.ZOEngine.block_names(model))
    batches = _batches(6)
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    with zo2tier.ZOEngine.from_store(tmp_path / "store", budget=BIG, config=cfg, placement=place) as ref:
        ref_results = [ref.step(b) for b in batches]
        ref_log, ref_state = list(ref.log), ref.state_dict()
    zo2tier.convert(tmp_path / "hf", tmp_path / "store2", progress=False)
    e = zo2tier.ZOEngine.from_store(tmp_path / "store2", budget=BIG, config=cfg, placement=place)
    results = [e.step(b) for b in batches[:4]]
    e.save_checkpoint(tmp_path / "ck", extra_state={"position": 4})  # fzoo-ema: its state (v, t) goes too
    e.close()
    with zo2tier.ZOEngine.resume(tmp_path / "ck") as r:
        assert (r.config.estimator, r.config.n_perturbations, r.config.perturbation) == \
            (name, q, cfg.perturbation)
        results += [r.step(b) for b in batches[4:]]
        state = r.state_dict()
        assert [x.step_seed for x in r.log[-2 * q :]] == [x.step_seed for x in ref_log[-2 * q :]]
        assert [x.projected_grad for x in r.log[-2 * q :]] == [x.projected_grad for x in ref_log[-2 * q :]]
        r.export(tmp_path / "out")
    assert [(x.loss_plus, x.loss_minus) for x in results] == [(x.loss_plus, x.loss_minus) for x in ref_results]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key
        assert torch.equal(exported[key], state[key]), key


def test_auto_perturbations_run_a_step(tmp_path):
    """q = 'auto' resolves to a concrete q >= the estimator's minimum and logs that many entries."""
    model = tiny_model("llama")
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-2, estimator="fzoo", n_perturbations="auto")
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=cfg,
                          placement=spread(zo2tier.ZOEngine.block_names(model))) as engine:
        engine.step(tiny_batch())
        assert len(engine.log) >= 2
        assert all(e.lr > 0 for e in engine.log)
