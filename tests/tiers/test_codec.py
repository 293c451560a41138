"""Storage codec: stochastic rounding is unbiased, round-to-nearest stalls, and re-encoding is exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from zo2tier.tiers import codec
from zo2tier.tiers.codec import INT8_GROUP, decode, encode, encoded_bytes, int8_scales

N_STEPS = 1000
STEP_QUANTA = 1e-3  # each update is 1e-3 of the storage quantum
NUMEL = 8192  # the mean over NUMEL elements of a ~1-quantum, ~1-quantum-noisy change: std ~ 1 / 90


def _start(dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Start values and their storage quantum, per element."""
    g = torch.Generator().manual_seed(0)
    if dtype == "int8":
        x = torch.randn(NUMEL, generator=g) * 0.02
        raw = torch.empty(encoded_bytes(NUMEL, dtype), dtype=torch.uint8)
        encode(x, dtype, raw, sr_seed=0, sr_key=0, stochastic=False)
        quantum = int8_scales(raw, NUMEL).repeat_interleave(INT8_GROUP)
        return decode(raw, dtype, NUMEL, torch.empty(NUMEL)), quantum
    # [1, 1.75): one binade, so the quantum is fixed and a one-quantum drift never leaves it
    x = 1.0 + 0.75 * torch.rand(NUMEL, generator=g)
    mantissa_bits = {"bf16": 7, "fp16": 10}[dtype]
    x = x.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]).float()
    return x, torch.full((NUMEL,), 2.0**-mantissa_bits)


def _drift(dtype: str, *, stochastic: bool) -> tuple[float, float]:
    """(mean stored change, mean fp32 reference change), both in quanta, after N_STEPS tiny updates."""
    x0, quantum = _start(dtype)
    delta = STEP_QUANTA * quantum
    ref, work = x0.clone(), x0.clone()
    raw = torch.empty(encoded_bytes(NUMEL, dtype), dtype=torch.uint8)
    prev = None
    for t in range(N_STEPS):
        ref += delta
        work += delta
        encode(work, dtype, raw, sr_seed=t, sr_key=1, stochastic=stochastic, prev_scales=prev)
        decode(raw, dtype, NUMEL, work)
        prev = int8_scales(raw, NUMEL).clone() if dtype == "int8" else None
    return float(((work - x0) / quantum).mean()), float(((ref - x0) / quantum).mean())


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(dtype):
    stored, reference = _drift(dtype, stochastic=True)
    assert reference == pytest.approx(1.0, rel=0.03)  # 1000 updates of 1e-3 quantum (fp32 rounding aside)
    assert stored == pytest.approx(reference, rel=0.05), (dtype, stored, reference)
    nearest, _ = _drift(dtype, stochastic=False)
    assert nearest != pytest.approx(reference, rel=0.05), (dtype, nearest, reference)  # the check can fail
    assert abs(nearest) < 0.05  # round-to-nearest throws every update away


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("stochastic", [True, False])
def test_reencoding_a_decoded_block_is_exact(dtype, stochastic):
    numel = 10 * INT8_GROUP + 13  # a partial last group and alignment padding
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1)) * 0.02
    x[:INT8_GROUP] = 0.0  # an all-zero group
    raw = torch.empty(encoded_bytes(numel, dtype), dtype=torch.uint8)
    encode(x, dtype, raw, sr_seed=5, sr_key=2)  # stochastic: some group maxima round down
    for trial in range(4):
        again = torch.full_like(raw, 0xAB)  # garbage in the padding must not survive
        prev = int8_scales(raw, numel) if dtype == "int8" else None
        decoded = decode(raw, dtype, numel, torch.empty(numel))
        encode(decoded, dtype, again, sr_seed=100 + trial, sr_key=2, stochastic=stochastic, prev_scales=prev)
        assert torch.equal(again, raw), (dtype, trial, int((again != raw).sum()))


@pytest.mark.parametrize("shrink", [0.94, 0.9375, 0.93])
def test_int8_reencoding_is_exact_at_the_band_edge(shrink):
    """A group shrunk to the bottom of its scale band (absmax near 119 quanta) still re-encodes exactly."""
    numel = 64 * INT8_GROUP
    x = torch.randn(numel, generator=torch.Generator().manual_seed(4))
    raw = torch.empty(encoded_bytes(numel, "int8"), dtype=torch.uint8)
    encode(x, "int8", raw, sr_seed=0, sr_key=0, stochastic=False)
    shrunk = decode(raw, "int8", numel, torch.empty(numel)) * shrink
    encode(shrunk, "int8", raw, sr_seed=1, sr_key=0, prev_scales=int8_scales(raw, numel).clone())
    for trial in range(3):
        again = torch.empty_like(raw)
        decoded = decode(raw, "int8", numel, torch.empty(numel))
        encode(decoded, "int8", again, sr_seed=2 + trial, sr_key=0, prev_scales=int8_scales(raw, numel))
        assert torch.equal(again, raw), (shrink, trial)


def test_int8_scales_have_17_bits_and_decode_exactly():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    raw = torch.empty(encoded_bytes(4096, "int8"), dtype=torch.uint8)
    encode(x, "int8", raw, sr_seed=0, sr_key=0, stochastic=False)
    scales = int8_scales(raw, 4096)
    assert int((scales.view(torch.int32) & 0x7F).abs().sum()) == 0
    q = raw[:4096].view(torch.int8).double().view(-1, INT8_GROUP)
    exact = q * scales.double()[:, None]
    assert torch.equal(decode(raw, "int8", 4096, torch.empty(4096)).double(), exact.view(-1))
    assert int(q.abs().amax(dim=1).min()) == 127  # a fresh scale puts each group's absmax on 127
    assert float((decode(raw, "int8", 4096, torch.empty(4096)) - x).abs().max()) <= float(scales.max()) / 2 + 1e-7


def test_int8_keeps_a_fitting_scale_and_replaces_an_outgrown_one():
    x = torch.randn(2 * INT8_GROUP, generator=torch.Generator().manual_seed(3))
    raw = torch.empty(encoded_bytes(x.numel(), "int8"), dtype=torch.uint8)
    encode(x, "int8", raw, sr_seed=0, sr_key=0, stochastic=False)
    prev = int8_scales(raw, x.numel()).clone()
    y = x.clone()
    y[:INT8_GROUP] *= 0.97  # still in the band: keeps its scale
    y[INT8_GROUP:] *= 1.01  # outgrows 127 * scale: a new scale
    encode(y, "int8", raw, sr_seed=1, sr_key=0, prev_scales=prev)
    now = int8_scales(raw, x.numel())
    assert now[0] == prev[0] and now[1] > prev[1]
    with pytest.raises(ValueError, match="groups"):
        encode(y, "int8", raw, sr_seed=1, sr_key=0, prev_scales=prev[:1])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("keep_scales", [False, True])
@pytest.mark.parametrize("numel", [40 * INT8_GROUP, 37 * INT8_GROUP + 13])
def test_chunked_encoding_equals_one_pass(dtype, stochastic, keep_scales, numel, monkeypatch):
    """Encoding in group-aligned chunks (a uniform offset per chunk, a slice of the scales) gives the same bytes."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(numel, generator=g) * 0.02
    prev = None
    if keep_scales and dtype == "int8":  # fresh scales, or the stored ones kept where the group still fits
        raw = torch.empty(encoded_bytes(numel, dtype), dtype=torch.uint8)
        encode(x, dtype, raw, sr_seed=0, sr_key=4, stochastic=False)
        prev = int8_scales(raw, numel).clone()
        x = decode(raw, dtype, numel, torch.empty(numel)) * 0.97 + 1e-4 * torch.randn(numel, generator=g)
    outs = []
    for chunk in [1 << 24, 2 * INT8_GROUP, 5 * INT8_GROUP + 1, 1]:  # one pass, then several chunks
        monkeypatch.setattr(codec, "ENCODE_CHUNK_NUMEL", chunk)
        raw = torch.full((encoded_bytes(numel, dtype),), 0xAB, dtype=torch.uint8)  # garbage must not survive
        outs.append(encode(x, dtype, raw, sr_seed=9, sr_key=4, stochastic=stochastic, prev_scales=prev))
    for out in outs[1:]:
        assert torch.equal(out, outs[0]), int((out != outs[0]).sum())


@pytest.mark.parametrize("keep_scales", [False, True])
@pytest.mark.parametrize("numel", [40 * INT8_GROUP, 37 * INT8_GROUP + 13])
def test_int8_range_by_range_equals_one_encode(keep_scales, numel):
    """encode_int8_range over group-aligned ranges (what an int8 write-back does on the GPU) gives the bytes of
    one encode; a range that starts or ends inside a group is refused."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(numel, generator=g) * 0.02
    prev = None
    if keep_scales:
        raw = torch.empty(encoded_bytes(numel, "int8"), dtype=torch.uint8)
        encode(x, "int8", raw, sr_seed=0, sr_key=4, stochastic=False)
        prev = int8_scales(raw, numel).clone()
        x = decode(raw, "int8", numel, torch.empty(numel)) * 0.97 + 1e-4 * torch.randn(numel, generator=g)
    want = encode(x, "int8", torch.empty(encoded_bytes(numel, "int8"), dtype=torch.uint8), sr_seed=9, sr_key=4,
                  prev_scales=prev)
    got = torch.full((encoded_bytes(numel, "int8"),), 0xAB, dtype=torch.uint8)  # garbage must not survive
    cuts = [0, 3 * INT8_GROUP, 4 * INT8_GROUP, 20 * INT8_GROUP, numel]
    for lo, hi in itertools.pairwise(cuts):
        codec.encode_int8_range(x[lo:hi], got, numel, lo, sr_seed=9, sr_key=4, prev_scales=prev)
    assert torch.equal(got, want)
    for lo, n in [(5, INT8_GROUP), (0, INT8_GROUP + 1)]:
        with pytest.raises(ValueError, match="groups"):
            codec.encode_int8_range(x[lo : lo + n], got, numel, lo, sr_seed=9, sr_key=4)
