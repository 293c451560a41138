"""The fused arrival kernel (zo2tier.zo.fused.arrive) in Triton's interpreter, on CPU tensors, against the spec.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1, so wherever Triton is installed (CI:
the Makefile installs it beside the CPU torch) the kernel runs here on every push. The interpreter has no
libdevice fast-math functions, so on CPU tensors the kernel takes tl.log, tl.cos and tl.sin; the fast path
is covered on CUDA (tests/zo/test_kernels_cuda.py, tests/test_engine_cuda.py).

The kernel replays in the order θ ← θ − lr·(g·z + wd·θ) (fused.py's docstring), where the CPU spec
(kernels.apply_update_) computes θ − (f32(lr·g)·z + f32(lr·wd)·θ). So with Rademacher z (exactly ±1, from
the same Philox words) the kernel equals `_replay` below bit for bit, and with Gaussian z (Box–Muller
through other log/sin/cos) it equals the spec to float rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import tiny_model

from zo2tier.tiers import codec
from zo2tier.zo import fused, kernels, rng
from zo2tier.zo.update import LogEntry

pytestmark = pytest.mark.skipif(fused.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs Triton's interpreter (Triton installed, TRITON_INTERPRET=1)")

EPS = 1e-3
LOG = [LogEntry(i, rng.step_seed(7, i), 0.5 - 0.4 * i, 1e-3, 0.01) for i in range(3)]
NEW_SEED = rng.step_seed(7, len(LOG))
F32 = torch.float32


def _arrive(stored, param_id, kind, *, write_to=None, eps=EPS, log=LOG, z_offset=0, sr_offset=0, scales=None):
    """(plus, minus) from one call of the kernel."""
    plus, minus = torch.full_like(stored, float("nan"), dtype=F32), torch.full_like(stored, float("nan"), dtype=F32)
    fused.arrive(stored, param_id=param_id, decay=True, log=fused.PendingLog.build(log, stored.device),
                 new_seed=NEW_SEED, eps=eps, plus=plus, minus=minus, write_to=write_to, sr_seed=11, sr_key=3,
                 sr_offset=sr_offset, kind=kind, scales=scales, z_offset=z_offset)
    return plus, minus


def _replay(theta, param_id, kind):
    """The kernel's replay, one fp32 torch op at a time."""
    for e in LOG:
        z = rng.normal(e.step_seed, param_id, theta.numel(), kind=kind)
        lr, g, wd = (torch.tensor(v, dtype=F32) for v in (e.lr, e.projected_grad, e.weight_decay))
        theta = theta - lr * (g * z + wd * theta)
    return theta


def _spec(theta, param_id, kind):
    """The CPU spec: the replayed θ and θ ± εz from zo2tier.zo.kernels."""
    theta = theta.clone()
    for e in LOG:
        kernels.apply_update_(theta, step_seed=e.step_seed, param_id=param_id, lr=e.lr,
                              projected_grad=e.projected_grad, weight_decay=e.weight_decay, kind=kind)
    pm = [kernels.perturb_into(theta, torch.empty_like(theta), step_seed=NEW_SEED, param_id=param_id, scale=s,
                               kind=kind) for s in (EPS, -EPS)]
    return theta, *pm


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_every_parameter_of_a_tiny_model(kind):
    for param_id, p in enumerate(tiny_model("llama").parameters()):
        stored = p.detach().reshape(-1).clone()
        written = torch.empty_like(stored)
        plus, minus = _arrive(stored, param_id, kind, write_to=written)
        want = _spec(stored, param_id, kind)
        for got, spec in zip((written, plus, minus), want):
            torch.testing.assert_close(got, spec, rtol=2.5e-7, atol=2e-8)  # about 2 float32 ulps
        if kind == "rademacher":
            theta = _replay(stored, param_id, kind)
            z = rng.normal(NEW_SEED, param_id, stored.numel(), kind=kind)
            eps = torch.tensor(EPS, dtype=F32)
            assert torch.equal(written, theta) and torch.equal(plus, theta + eps * z)
            assert torch.equal(minus, theta - eps * z)


def test_pieces_draw_the_values_of_the_whole_parameter():
    """A parameter arriving in pieces (z_offset, sr_offset) gets the z and rounding of one call."""
    stored = torch.randn(3001, generator=torch.Generator().manual_seed(0)) * 0.02
    whole = torch.empty(stored.numel(), dtype=torch.bfloat16)
    want = _arrive(stored, 5, "gaussian", write_to=whole)
    pieces = torch.empty_like(whole)
    for lo, hi in [(0, 1024), (1024, 1028), (1028, 3001)]:  # starts on Philox groups of 4
        got = _arrive(stored[lo:hi], 5, "gaussian", write_to=pieces[lo:hi], z_offset=lo, sr_offset=lo)
        assert torch.equal(got[0], want[0][lo:hi]) and torch.equal(got[1], want[1][lo:hi])
    assert torch.equal(pieces, whole)


def test_bf16_write_back_rounds_stochastically_with_the_keyed_uniforms():
    stored = torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 0.02
    written = torch.empty(stored.numel(), dtype=torch.bfloat16)
    _arrive(stored, 2, "rademacher", write_to=written)
    theta = _replay(stored, 2, "rademacher")
    down = theta.to(torch.bfloat16, copy=True)  # nearest; the bf16 neighbour toward zero is one of these two
    toward_zero = torch.where(down.float().abs() > theta.abs(), down.view(torch.int16) - 1,
                              down.view(torch.int16)).view(torch.bfloat16)
    away = (toward_zero.view(torch.int16) + 1).view(torch.bfloat16)
    lo, hi = toward_zero.float().abs(), away.float().abs()
    u = rng.sr_uniform(11, 3, stored.numel())
    expected = torch.where(u < (theta.abs() - lo) / (hi - lo), away, toward_zero)
    assert torch.equal(written, expected)
    assert 0 < int((written == away).sum()) < stored.numel()  # both neighbours are used


def test_int8_storage_is_decoded_with_its_group_scales():
    numel = 5 * codec.INT8_GROUP + 17
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(2)) * 0.02
    raw = codec.encode(theta, "int8", torch.empty(codec.encoded_bytes(numel, "int8"), dtype=torch.uint8),
                       sr_seed=0, sr_key=1, stochastic=False)
    decoded = codec.decode(raw, "int8", numel, torch.empty(numel))
    q, scales = raw[:numel].view(torch.int8), codec.int8_scales(raw, numel)
    plus, minus = _arrive(q, 4, "rademacher", eps=0.0, log=[], scales=scales)
    assert torch.equal(plus, decoded) and torch.equal(minus, decoded)  # eps = 0: θ itself, no z drawn
