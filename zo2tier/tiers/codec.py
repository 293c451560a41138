"""Storage dtypes: encode a clean fp32 block into its stored bytes and decode it back.

Pure tensor math: no I/O. Narrow dtypes are written with stochastic rounding (a keyed counter-based
uniform per element, see :func:`zo2tier.zo.rng.sr_uniform`), so that updates far below the storage
quantum survive on average instead of rounding to zero. int8 is symmetric with one fp32 absmax scale per
group of :data:`INT8_GROUP` consecutive elements of the flat block; the scales follow the int8 payload.

Re-encoding a decoded block is exact: ``encode(decode(x), prev_scales=scales of x) == x`` byte for byte,
with stochastic rounding too. Three rules make it so:

- a value already on the storage grid has rounding fraction 0 and never rounds away (``u < frac`` with
  ``u > 0``);
- int8 scales keep 17 significant bits, so ``q * scale`` (|q| <= 127, 7 bits) is exact in fp32 and
  ``decoded / scale`` gives back the integer ``q``;
- a group keeps its previous scale while its absmax stays in ``[119, 127] * scale``; a
  new scale (placing the absmax mid-band) is computed only when the group outgrows or underfills that band.
  A block re-encoded every step would otherwise re-quantize its groups at every step and add a full
  quantum of rounding noise each time.
"""

from __future__ import annotations

import torch

from zo2tier.dtypes import FLOAT_DTYPES, STORAGE_DTYPES, dtype_name  # noqa: F401 (re-exported)
from zo2tier.zo.rng import sr_uniform

INT8_GROUP = 128  # 4 bytes of scale per 128 weights: 1.031 bytes per parameter
INT8_BAND = 1.0 / 16  # a group keeps its scale while absmax / scale stays within [_KEEP_MIN_Q, 127]
_KEEP_MIN_Q = float(int(127 * (1 - INT8_BAND)))  # 119: an integer, so rounding never leaves the band
_SCALE_LOW_BITS = 0x7F  # cleared (rounding up) so scales keep 17 significant bits
# elements encoded at a time: bounds encode's temporaries (~25 bytes per element for int8) to a constant
# instead of a block. Chunks start on int8 group boundaries and the rounding uniforms are drawn at their
# offsets, so the bytes equal a one-pass encode whatever the chunk size.
ENCODE_CHUNK_NUMEL = 1 << 24
# elements of an int8 write-back that the engine replays into fp32 and encodes at a time (whole groups); the
# planner counts 32 bytes per element of it (the fp32 range and the encoder's temporaries)
WRITE_BACK_RANGE_NUMEL = 1 << 22
_TORCH = FLOAT_DTYPES


def check_storage(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is unknown; use one of {', '.join(STORAGE_DTYPES)}")
    return dtype


def encoded_bytes(numel: int, dtype: str) -> int:
    """Bytes that ``numel`` elements take when stored as ``dtype``."""
    if check_storage(dtype) == "int8":
        return _scale_offset(numel) + 4 * _n_groups(numel)
    return numel * torch.finfo(_TORCH[dtype]).bits // 8


def _n_groups(numel: int) -> int:
    return (numel + INT8_GROUP - 1) // INT8_GROUP


def _scale_offset(numel: int) -> int:
    return (numel + 3) // 4 * 4  # the fp32 scales start 4-byte aligned after the int8 payload


def int8_scales(raw: torch.Tensor, numel: int) -> torch.Tensor:
    """The fp32 group scales inside the uint8 bytes ``raw`` of an int8 block of ``numel`` elements (a view)."""
    start = _scale_offset(numel)
    return raw[start : start + 4 * _n_groups(numel)].view(torch.float32)


def decode(raw: torch.Tensor, dtype: str, numel: int, out: torch.Tensor) -> torch.Tensor:
    """Fill fp32 ``out[:numel]`` from the uint8 bytes ``raw`` holding a block stored as ``dtype``."""
    if dtype == "int8":
        q = raw[:numel].view(torch.int8)
        scales = int8_scales(raw, numel)
        body = (numel // INT8_GROUP) * INT8_GROUP
        dst = out[:body].view(-1, INT8_GROUP)
        dst.copy_(q[:body].view(-1, INT8_GROUP))
        dst.mul_(scales[: body // INT8_GROUP, None])
        if body < numel:
            out[body:numel].copy_(q[body:numel]).mul_(scales[-1])
        return out
    out[:numel].copy_(raw[: encoded_bytes(numel, dtype)].view(_TORCH[dtype]))
    return out


def encode(
    src: torch.Tensor,
    dtype: str,
    raw: torch.Tensor,
    *,
    sr_seed: int,
    sr_key: int,
    stochastic: bool = True,
    prev_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write fp32 ``src`` (flat) into the uint8 buffer ``raw`` as ``dtype``.

    Narrow dtypes round stochastically with the uniforms keyed by ``(sr_seed, sr_key)``; pass
    ``stochastic=False`` for round-to-nearest (used to show that it stalls training). For int8,
    ``prev_scales`` (the block's stored scales, see :func:`int8_scales`) lets each group keep its scale
    while it still fits, which makes re-encoding a decoded block exact.
    """
    numel = src.numel()
    if dtype == "fp32":
        raw[: 4 * numel].view(torch.float32).copy_(src)
        return raw
    if dtype == "int8":
        n_groups = _n_groups(numel)
        if prev_scales is not None and prev_scales.shape != (n_groups,):
            raise ValueError(f"prev_scales has {prev_scales.numel()} groups but the block has {n_groups}; "
                             "pass the scales of this block's stored copy (int8_scales(raw, numel))")
        q, scales = raw[:numel].view(torch.int8), int8_scales(raw, numel)
        raw[numel : _scale_offset(numel)].zero_()  # the alignment padding is part of the stored bytes
    else:
        target = raw[: encoded_bytes(numel, dtype)].view(_TORCH[dtype])
    chunk = max(INT8_GROUP, ENCODE_CHUNK_NUMEL // INT8_GROUP * INT8_GROUP)
    for lo in range(0, numel, chunk):
        hi = min(lo + chunk, numel)
        noise = sr_uniform(sr_seed, sr_key, hi - lo, offset=lo, device=src.device) if stochastic else None
        if dtype == "int8":
            g0, g1 = lo // INT8_GROUP, _n_groups(hi)
            prev = None if prev_scales is None else prev_scales[g0:g1]
            _encode_int8(src[lo:hi], q[lo:hi], scales[g0:g1], noise, prev)
        elif noise is None:
            target[lo:hi].copy_(src[lo:hi])
        else:
            target[lo:hi].copy_(_round_float_stochastic(src[lo:hi], _TORCH[dtype], noise))
    return raw


def encode_int8_range(
    part: torch.Tensor,
    raw: torch.Tensor,
    numel: int,
    lo: int,
    *,
    sr_seed: int,
    sr_key: int,
    prev_scales: torch.Tensor | None = None,
    fused_kernel: bool = False,
) -> None:
    """Encode elements ``[lo, lo + part.numel())`` of an int8 block of ``numel`` elements into its bytes ``raw``.

    ``lo`` is a group boundary and the range ends on one or at ``numel``. Encoding a block range by range
    gives the bytes of one :func:`encode` (same uniforms, same scales), so a write-back needs fp32 room for
    one range, not the block. ``prev_scales`` are the whole block's stored scales. ``fused_kernel``: encode
    with :func:`zo2tier.zo.fused.encode_int8` (one Triton kernel, the same bytes in the Triton interpreter)
    instead of torch ops."""
    hi = lo + part.numel()
    if lo % INT8_GROUP or (hi % INT8_GROUP and hi != numel) or hi > numel:
        raise ValueError(f"range [{lo}, {hi}) of a {numel}-element block must start and end on "
                         f"{INT8_GROUP}-element groups (or end at the block's end)")
    q, scales = raw[:numel].view(torch.int8), int8_scales(raw, numel)
    if hi == numel:
        raw[numel : _scale_offset(numel)].zero_()
    g0, g1 = lo // INT8_GROUP, _n_groups(hi)
    prev = None if prev_scales is None else prev_scales[g0:g1]
    if fused_kernel:
        from zo2tier.zo import fused

        fused.encode_int8(part, q[lo:hi], scales[g0:g1], prev, sr_seed=sr_seed, sr_key=sr_key, offset=lo,
                          group=INT8_GROUP)
        return
    noise = sr_uniform(sr_seed, sr_key, hi - lo, offset=lo, device=part.device)
    _encode_int8(part, q[lo:hi], scales[g0:g1], noise, prev)


def _round_float_stochastic(src: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """Round fp32 to ``dtype`` up or down with probability proportional to the distance."""
    down = src.to(dtype)
    low = down.float()
    # the neighbour on the other side of src
    toward = torch.where(low <= src, torch.full_like(src, float("inf")), torch.full_like(src, float("-inf")))
    other = torch.nextafter(down, toward.to(dtype)).float()
    gap = other - low
    frac = torch.where(gap != 0, (src - low) / gap, torch.zeros_like(src))
    pick = (u < frac) & torch.isfinite(other)
    return torch.where(pick, other, low).to(dtype)


def _ceil_scale(x: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 ``x`` up to 17 significant bits (exact products with 7-bit integers)."""
    bits = x.view(torch.int32)
    return ((bits + _SCALE_LOW_BITS) & ~_SCALE_LOW_BITS).view(torch.float32)


def _int8_group_scales(absmax: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """Per-group scales: the previous one while the group fits its band, else a fresh one."""
    fresh = _ceil_scale(absmax / 127.0)
    if prev is not None:
        prev = prev.to(absmax.device)
        top = prev * 127.0  # exact: prev has 17 significant bits
        keep = (absmax <= top) & (absmax >= prev * _KEEP_MIN_Q) & (prev > 0)
        mid = _ceil_scale(absmax / (127.0 * (1.0 - INT8_BAND / 2)))  # absmax lands mid-band
        fresh = torch.where(keep, prev, mid)
    return torch.where(fresh > 0, fresh, torch.ones_like(fresh))


def _encode_int8(
    src: torch.Tensor, q_out: torch.Tensor, scales_out: torch.Tensor, u: torch.Tensor | None,
    prev: torch.Tensor | None,
) -> None:
    """Quantize fp32 ``src`` (whole groups but the last) into int8 ``q_out`` and its group scales ``scales_out``."""
    numel = src.numel()
    n_groups = _n_groups(numel)
    padded = torch.zeros(n_groups * INT8_GROUP, dtype=torch.float32, device=src.device)
    padded[:numel] = src
    groups = padded.view(n_groups, INT8_GROUP)  # (G, 128)
    scales = _int8_group_scales(groups.abs().amax(dim=1), prev)  # (G,)
    scaled = groups / scales[:, None]  # on-grid values give exact integers
    if u is None:
        q = scaled.round()
    else:
        noise = torch.ones_like(padded)  # padding never rounds up
        noise[:numel] = u
        q = scaled.floor()
        q += noise.view(n_groups, INT8_GROUP) < (scaled - q)  # the fraction is exact; 0 never rounds
    q_out.copy_(q.clamp_(-127, 127).to(torch.int8).view(-1)[:numel])
    scales_out.copy_(scales)
