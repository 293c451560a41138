"""Stacked copies (zo2tier/model/proxy.py ``run_stacked``, zo2tier/visit/stacking.py): a step of more than
two copies runs each block part once, vmapped over its copies' stacked weights, and computes what one copy at
a time computes. The engine stacks on CUDA only (``zo2tier.plan.STACK_BYTES``); these tests turn it on for the
CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_batch, tiny_model
from torch import nn

import zo2tier
from zo2tier import plan
from zo2tier.model import proxy
from zo2tier.visit import stacking

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}


def _steps(arch, q, stack_bytes, monkeypatch, tmp_path, estimator="fzoo"):
    """Two steps' losses and log, with ``stack_bytes`` of stacked weights (0: one copy at a time), and the
    number of stacked calls made."""
    monkeypatch.setattr(plan, "STACK_BYTES", {"cpu": stack_bytes})
    monkeypatch.setattr(proxy, "_UNSTACKABLE", set())
    calls = []
    real = proxy.run_stacked
    monkeypatch.setattr(proxy, "run_stacked", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-2, seed=3, estimator=estimator, n_perturbations=q)
    model = tiny_model(arch)
    names = zo2tier.ZOEngine.block_names(model)
    placement = {n: ("device", "host", "disk")[i % 3] for i, n in enumerate(names)}
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path / str(stack_bytes), config=cfg,
                          placement=placement) as engine:
        results = [engine.step(tiny_batch(seed=s)) for s in range(2)]
        return results, [e.projected_grad for e in engine.log], engine.state_dict(), calls


@pytest.mark.filterwarnings("error:.*cannot run its copies stacked")  # every part must really run stacked
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "bloom"])
def test_stacked_copies_compute_what_one_copy_at_a_time_computes(arch, monkeypatch, tmp_path):
    stacked, g_stacked, _, calls = _steps(arch, 3, 1 << 30, monkeypatch, tmp_path)
    looped, g_looped, _, none = _steps(arch, 3, 0, monkeypatch, tmp_path)
    assert calls and not none  # the parts ran stacked, all 4 copies in one span; with 0 bytes never
    assert all(spans == [(0, 4)] for spans in calls)
    for a, b in zip(stacked, looped):
        assert a.loss_plus == pytest.approx(b.loss_plus, rel=1e-6)
        assert a.loss_minus == pytest.approx(b.loss_minus, rel=1e-6)
    assert g_stacked == pytest.approx(g_looped, rel=1e-4, abs=1e-3)


def test_spans_hold_as_many_copies_as_the_bytes_allow_and_never_split_a_pair(monkeypatch, tmp_path):
    """mezo q = 3 runs 3 ± pairs; room for 3 copies of the largest part gives spans of one pair each."""
    model = tiny_model("llama")
    with zo2tier.ZOEngine(model, budget=BIG, config=zo2tier.MeZOConfig()) as engine:
        part_bytes = engine.runner.bindings.largest_part(engine.runner.resident) * 4
    _, _, _, calls = _steps("llama", 3, 3 * part_bytes, monkeypatch, tmp_path, estimator="mezo")
    assert calls and all(spans == [(0, 2), (2, 4), (4, 6)] for spans in calls)


@pytest.mark.filterwarnings("error:.*cannot run its copies stacked")
@pytest.mark.parametrize(("estimator", "q"), [("fzoo", 4), ("mezo", 2)])
def test_the_cpu_runs_one_copy_at_a_time_by_default(estimator, q, monkeypatch):
    """No room for two copies (the CPU's default; an OPT-13B part on CUDA): never tried stacked, not even a
    ± pair, and no stack buffer is made."""
    monkeypatch.setattr(proxy, "_UNSTACKABLE", set())
    calls = []
    real = proxy.run_stacked
    monkeypatch.setattr(proxy, "run_stacked", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    cfg = zo2tier.MeZOConfig(lr=1e-3, estimator=estimator, n_perturbations=q)
    with zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, config=cfg) as engine:
        engine.step(tiny_batch())
        assert engine.runner.stack.copies_per_call == 1 and not engine.runner.stack.allocated
    assert not calls and not proxy._UNSTACKABLE


def test_spans_by_hand(monkeypatch):
    monkeypatch.setattr(plan, "STACK_BYTES", {"cpu": 3 * 400})  # 3 copies of a 100-weight fp32 part
    stack = stacking.CopyStack(100, torch.float32, torch.device("cpu"))
    mezo = [(7, 0.1), (7, -0.1), (8, 0.1), (8, -0.1), (9, 0.1), (9, -0.1)]
    fzoo = [(0, 0.0), (7, 0.1), (8, 0.1), (9, 0.1), (10, 0.1)]
    assert stack.copies_per_call == 3
    assert stack.spans(mezo) == [(0, 2), (2, 4), (4, 6)]  # a pair is never cut, so 2 a span
    assert stack.spans(fzoo) == [(0, 3), (3, 5)]
    assert stack.spans(mezo[:2]) == [] and stack.spans(fzoo[:2]) == []  # two copies: one at a time
    assert stack.rows(2, len(fzoo)).shape == (2, 100) and stack.rows(3, 5).shape == (3, 100)
    monkeypatch.setattr(plan, "STACK_BYTES", {"cpu": 399})
    assert stack.copies_per_call == 1 and stack.spans(fzoo) == []


def test_tiers_stay_bit_identical_to_all_on_device_with_stacked_copies(monkeypatch, tmp_path):
    _, _, spread, calls = _steps("llama", 4, 1 << 30, monkeypatch, tmp_path)
    monkeypatch.setattr(plan, "STACK_BYTES", {"cpu": 1 << 30})
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-2, seed=3, estimator="fzoo", n_perturbations=4)
    with zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, config=cfg) as engine:
        for s in range(2):
            engine.step(tiny_batch(seed=s))
        on_device = engine.state_dict()
    assert calls
    for name, value in on_device.items():
        assert torch.equal(value, spread[name]), name


class _NoSetupContext(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class _Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return _NoSetupContext.apply(x * self.weight)


def test_a_module_vmap_refuses_runs_one_copy_at_a_time_with_a_warning(monkeypatch):
    monkeypatch.setattr(proxy, "_UNSTACKABLE", set())
    inner = _Doubler()
    x = torch.arange(12.0).view(4, 3)  # 4 copies of a 1-row batch
    weights = [torch.full((3,), float(i + 1)) for i in range(4)]

    def stacked(a, b):
        return {"weight": torch.stack(weights[a:b])}

    with pytest.warns(UserWarning, match="_Doubler cannot run its copies stacked"):
        out = proxy.run_groups(inner, lambda i: {"weight": weights[i]}, (x,), {}, 4, 4, stacked=stacked,
                               spans=[(0, 4)])
    assert torch.equal(out, 2 * x * torch.stack(weights))
    assert _Doubler in proxy._UNSTACKABLE and proxy.unstackable_modules() == ["_Doubler"]


def test_run_stacked_shares_inputs_without_the_batch_and_cuts_those_with_it():
    """A (4-copy, 2-row) batch: the hidden rows go to their copy, a bias without the batch is shared."""
    lin = nn.Linear(3, 2, bias=False)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    shared = torch.tensor([1.0, -1.0])
    ws = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    class WithBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, bias):
            return self.lin(x) + bias, None

    out, nothing = proxy.run_stacked(WithBias(), lambda a, b: {"lin.weight": torch.stack(ws[a:b])}, [(0, 3), (3, 4)],
                                     (x,), {"bias": shared}, {}, 4, 8)
    want = torch.cat([x[2 * i : 2 * i + 2] @ ws[i].T + shared for i in range(4)])
    assert nothing is None and torch.allclose(out, want, atol=1e-6)


class _ScalesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x):
        x.mul_(2)  # an input written in place, then something vmap refuses
        return _NoSetupContext.apply(x * self.weight)


def test_a_module_that_wrote_its_input_before_vmap_refused_raises_instead_of_running_twice(monkeypatch):
    monkeypatch.setattr(proxy, "_UNSTACKABLE", set())
    x = torch.arange(12.0).view(4, 3)
    weights = [torch.full((3,), float(i + 1)) for i in range(4)]
    with pytest.raises(RuntimeError, match="autograd.Function"):
        proxy.run_groups(_ScalesInPlace(), lambda i: {"weight": weights[i]}, (x,), {}, 4, 4,
                         stacked=lambda a, b: {"weight": torch.stack(weights[a:b])}, spans=[(0, 4)])
