"""The Triton int8 encoder gives the torch codec's bytes: same group scales, same rounding uniforms.

Runs on CUDA with Triton, or on the CPU in the Triton interpreter (``TRITON_INTERPRET=1``, which
tests/conftest.py sets without CUDA; CI installs Triton for it, see docs/dependencies.md); skipped where
Triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

from zo2tier.tiers import codec
from zo2tier.tiers.codec import INT8_GROUP
from zo2tier.zo import fused
from zo2tier.zo.rng import sr_uniform

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    fused.triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton on CUDA, or Triton's interpreter on the CPU (TRITON_INTERPRET=1)")


@pytest.mark.parametrize(("numel", "lo", "keep"), [(40 * INT8_GROUP, 0, False), (37 * INT8_GROUP + 13, 256, True),
                                                   (5 * INT8_GROUP + 1, 1024, False), (9 * INT8_GROUP, 0, True)])
def test_triton_int8_encoder_gives_the_codec_bytes(numel, lo, keep):
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g) * 0.02
    prev = None
    if keep:  # stored scales, kept where the group still fits; some groups outgrow theirs
        raw = torch.empty(codec.encoded_bytes(numel, "int8"), dtype=torch.uint8)
        codec.encode(x, "int8", raw, sr_seed=0, sr_key=4, stochastic=False)
        prev = codec.int8_scales(raw, numel).clone()
        x = codec.decode(raw, "int8", numel, torch.empty(numel)) * 0.97 + 1e-4 * torch.randn(numel, generator=g)
        x[:INT8_GROUP] *= 1.5
    n_groups = (numel + INT8_GROUP - 1) // INT8_GROUP
    q_ref, s_ref = torch.empty(numel, dtype=torch.int8), torch.empty(n_groups)
    codec._encode_int8(x, q_ref, s_ref, sr_uniform(9, 4, numel, offset=lo), prev)
    q = torch.full((numel,), 99, dtype=torch.int8, device=DEVICE)
    s = torch.full((n_groups,), -1.0, device=DEVICE)
    fused.encode_int8(x.to(DEVICE), q, s, None if prev is None else prev.to(DEVICE), sr_seed=9, sr_key=4, offset=lo)
    assert torch.equal(q.cpu(), q_ref), int((q.cpu() != q_ref).sum())
    assert torch.equal(s.cpu(), s_ref)


def test_fused_range_encode_equals_one_encode():
    """encode_int8_range(fused_kernel=True) over group-aligned ranges writes the bytes of one torch encode."""
    numel = 37 * INT8_GROUP + 13
    x = torch.randn(numel, generator=torch.Generator().manual_seed(3)) * 0.02
    want = codec.encode(x, "int8", torch.empty(codec.encoded_bytes(numel, "int8"), dtype=torch.uint8), sr_seed=9,
                        sr_key=4)
    got = torch.full((codec.encoded_bytes(numel, "int8"),), 0xAB, dtype=torch.uint8, device=DEVICE)
    xd = x.to(DEVICE)
    for lo, hi in [(0, 3 * INT8_GROUP), (3 * INT8_GROUP, 20 * INT8_GROUP), (20 * INT8_GROUP, numel)]:
        codec.encode_int8_range(xd[lo:hi], got, numel, lo, sr_seed=9, sr_key=4, fused_kernel=True)
    assert torch.equal(got.cpu(), want)
