"""CUDA paths of the perturbation RNG against the CPU reference (skipped without a GPU).

The design goal is bit-identical z on every path (IEEE-exact ops only, no FMA contraction), so
each comparison checks ``torch.equal``; the 1e-5 tolerance checks come first so that a failure
says whether the paths drifted a little or disagree outright.
"""

from __future__ import annotations

import pytest
import torch

from zo2tier.zo import kernels, rng

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KEYS = [(0, 0), (12345, 7), (2**32 - 1, 2**31), (3, 2**32 - 1), (1, 0)]
SIZES = [1, 3, 4, 5, 1001, 2048, 4097, 300_001]
KINDS = ["gaussian", "rademacher"]


def _close_then_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.cpu(), want.cpu())


def _triton_z(step_seed: int, param_id: int, numel: int, kind: str) -> torch.Tensor:
    """z through the fused Triton perturbation: 0 + 1.0 * z is z exactly."""
    theta = torch.zeros(numel, device="cuda")
    out = torch.empty(numel, device="cuda")
    return kernels.perturb_into(theta, out, step_seed=step_seed, param_id=param_id, scale=1.0, kind=kind)


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
@pytest.mark.parametrize("kind", KINDS)
def test_triton_z_matches_cpu(kind: str) -> None:
    for step_seed, param_id in KEYS:
        for n in SIZES:
            _close_then_equal(
                _triton_z(step_seed, param_id, n, kind), rng.normal(step_seed, param_id, n, kind=kind)
            )


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_triton_z_slices_match_cpu_offsets() -> None:
    z = _triton_z(77, 5, 10_000, "gaussian").cpu()
    for offset, n in [(1, 7), (3, 4096), (4097, 33), (9_999, 1)]:
        _close_then_equal(z[offset : offset + n], rng.normal(77, 5, n, offset=offset))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_cuda_normal_matches_cpu(kind: str) -> None:
    for step_seed, param_id in KEYS[:3]:
        for n, offset in [(5, 0), (1001, 3), (4097, 6), (300_001, 1)]:
            got = rng.normal(step_seed, param_id, n, offset=offset, device="cuda", kind=kind)
            _close_then_equal(got, rng.normal(step_seed, param_id, n, offset=offset, kind=kind))


def test_torch_cuda_sr_uniform_matches_cpu() -> None:
    _close_then_equal(
        rng.sr_uniform(9, 4, 1003, offset=2, device="cuda"), rng.sr_uniform(9, 4, 1003, offset=2)
    )


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])  # fmt: skip
def test_perturb_matches_cpu(monkeypatch, use_triton: bool, src: torch.dtype, dst: torch.dtype) -> None:
    if use_triton and kernels.triton is None:
        pytest.skip("needs Triton")
    if not use_triton:
        monkeypatch.setattr(kernels, "triton", None)
    theta = torch.randn(40_003, generator=torch.Generator().manual_seed(0)).to(src)
    for scale in (1e-3, -1e-3):
        want = kernels.perturb_into(
            theta, torch.empty(40_003, dtype=dst), step_seed=11, param_id=2, scale=scale
        )
        got = kernels.perturb_into(
            theta.cuda(), torch.empty(40_003, dtype=dst, device="cuda"), step_seed=11, param_id=2, scale=scale
        )
        _close_then_equal(got.float(), want.float())


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_update_matches_cpu(monkeypatch, use_triton: bool, weight_decay: float) -> None:
    if use_triton and kernels.triton is None:
        pytest.skip("needs Triton")
    if not use_triton:
        monkeypatch.setattr(kernels, "triton", None)
    theta = torch.randn(70_001, generator=torch.Generator().manual_seed(1))
    kw = {"step_seed": 3, "param_id": 9, "lr": 1e-2, "projected_grad": -0.7, "weight_decay": weight_decay}
    want = kernels.apply_update_(theta.clone(), **kw)
    got = kernels.apply_update_(theta.cuda(), **kw)
    _close_then_equal(got, want)
