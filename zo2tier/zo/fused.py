"""One fused pass over a parameter on arrival: replay pending updates, write back, build θ+εz and θ−εz.

For float storage (fp32 / fp16 / bf16) on CUDA, a Triton kernel reads the stored weights once, replays
the update log in fp32 registers (z regenerated from its keys), optionally writes the result back to
storage with stochastic rounding, and writes both perturbed copies into scratch. That replaces the
decode, replay, encode and two perturbation passes of the generic path with one read and up to three
writes. z follows the keyed Philox spec of :mod:`zo2tier.zo.rng` (same words, same uniform map;
Box–Muller through the GPU's fast ``log``/``sin``/``cos``, so values agree with the CPU up to float rounding:
at most 1.9e-6 apart over 2**24 values, the same as with libdevice's correctly rounded functions, and the
replay of a logged update runs 1.8–1.95× faster; ``tools/bench_replay.py``).

The kernel's fp32 op order per element, which every tier on the GPU shares:
``θ ← θ − lr·(g·z + wd·θ)`` for each pending entry, then ``θ±ε·z_new`` rounded to the scratch dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # Triton is optional: CPU machines and CUDA without Triton use the generic path
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

# On the GPU, Box-Muller runs through the fast log / sin / cos (special-function units), not libdevice's
# correctly rounded ones: 1.8-1.95x faster replays at the same distance from the spec
# (benchmarks/replay_h100.jsonl); see _ln and _cos_sin_2pi for how each stays within float rounding of the
# spec. Triton's CPU interpreter has no fast functions: there (CPU tensors) the kernel uses tl.log/cos/sin.

_SR_DOMAIN = 0x80000000
_FLOAT_STORAGE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}


def available(device: torch.device, storage_dtype: torch.dtype) -> bool:
    """True where the fused kernel serves: CUDA, Triton importable, float or int8 storage (int8: reads only)."""
    return triton is not None and device.type == "cuda" and storage_dtype in _FLOAT_STORAGE


@dataclass(frozen=True)
class PendingLog:
    """The log entries to replay, as device arrays (built once per step, shared by every block)."""

    seeds: torch.Tensor  # int64 step seeds (uint32 values)
    grads: torch.Tensor  # float32 projected gradients
    lrs: torch.Tensor  # float32
    wds: torch.Tensor  # float32 weight decay
    n: int

    @classmethod
    def build(cls, entries, device: torch.device) -> PendingLog:
        live = [e for e in entries if e.lr != 0.0]
        rows = torch.tensor([[float(e.projected_grad), float(e.lr), float(e.weight_decay)] for e in live] or [[0.0] * 3],
                            dtype=torch.float32)
        seeds = torch.tensor([e.step_seed for e in live] or [0], dtype=torch.int64)
        rows, seeds = rows.to(device), seeds.to(device)
        return cls(seeds, rows[:, 0].contiguous(), rows[:, 1].contiguous(), rows[:, 2].contiguous(), len(live))


def arrive(
    stored: torch.Tensor,
    *,
    param_id: int,
    decay: bool,
    log: PendingLog,
    new_seed: int,
    eps: float,
    plus: torch.Tensor,
    minus: torch.Tensor | None,
    write_to: torch.Tensor | None,
    sr_seed: int,
    sr_key: int,
    sr_offset: int,
    kind: str = "gaussian",
    scales: torch.Tensor | None = None,
    group: int = 128,
    z_offset: int = 0,
) -> None:
    """Replay ``log`` on ``stored`` (flat), write back into ``write_to`` (may alias ``stored``) and fill
    ``plus`` = θ+εz and ``minus`` = θ−εz (``minus=None``: only ``plus``, e.g. ``eps=0`` for evaluation).

    ``stored`` may be a piece of a parameter that starts ``z_offset`` elements into it (a multiple of 4, the
    Philox group): z is drawn for the parameter's own element indices, so pieces give the values of one pass.
    ``sr_offset`` is the piece's first element in the flat block (rounding uniforms and int8 scales)."""
    n = stored.numel()
    if n == 0:
        return
    if z_offset % 4:
        raise ValueError(f"z_offset={z_offset} must be a multiple of 4 (one Philox group draws 4 values)")
    if (write_to is not None and write_to.dtype == torch.int8) or (stored.dtype == torch.int8 and scales is None):
        raise ValueError("int8 storage is decoded by the kernel (pass scales) but written back by the codec")
    grid = (triton.cdiv(n, 4 * _GROUPS),)
    _arrive_kernel[grid](
        stored, write_to if write_to is not None else stored, plus, minus if minus is not None else plus,
        n, (param_id << 32) | new_seed, float(eps),
        log.seeds, log.grads, log.lrs, log.wds, log.n, param_id << 32,
        ((sr_key | _SR_DOMAIN) << 32) | sr_seed, sr_offset, scales if scales is not None else stored, group,
        z_offset // 4, DECAY=decay, WRITE=write_to is not None, MINUS=minus is not None,
        STORE_KIND=_FLOAT_STORAGE[stored.dtype],
        OUT_KIND=_FLOAT_STORAGE[write_to.dtype] if write_to is not None else 0, RADEMACHER=kind == "rademacher", GROUPS=_GROUPS,
        PERTURB=eps != 0.0, FAST_Z=stored.device.type == "cuda",
    )


_GROUPS = 256  # Philox groups per program: 1,024 elements

if triton is not None:

    @triton.jit
    def _uniform(w):
        return ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # ((w >> 9) + 0.5) * 2**-23

    @triton.jit
    def _ln(u, FAST: tl.constexpr):
        """ln u for u in (0, 1). The fast log's error is absolute (about 4e-7 near 1), which is large against
        ln u where u nears 1: there (v = 1 - u < 1/4, exact) a Horner series of log1p(-v) to v**11 serves,
        truncated below 1e-7 relative."""
        if FAST:
            v = 1.0 - u
            p = 0.0909090909 * v + 0.1
            p = p * v + 0.1111111111
            p = p * v + 0.125
            p = p * v + 0.1428571429
            p = p * v + 0.1666666667
            p = p * v + 0.2
            p = p * v + 0.25
            p = p * v + 0.3333333333
            p = p * v + 0.5
            p = p * v + 1.0
            return tl.where(v < 0.25, -v * p, libdevice.fast_logf(u))
        else:
            return tl.log(u)

    @triton.jit
    def _cos_sin_2pi(u, FAST: tl.constexpr):
        """cos and sin of t = 2π·u (t rounded to float32 as the spec does). The fast functions are accurate
        to about 5e-7 on [-π, π], so they take t - π and flip both signs."""
        t = 6.2831854820251465 * u
        if FAST:
            s = t - 3.1415927410125732
            return -libdevice.fast_cosf(s), -libdevice.fast_sinf(s)
        else:
            return tl.cos(t), tl.sin(t)

    @triton.jit
    def _z4(seed, groups, RADEMACHER: tl.constexpr, FAST: tl.constexpr):
        """The 4 values of each Philox group, in element order (4·GROUPS,)."""
        w0, w1, w2, w3 = tl.randint4x(seed, groups)
        if RADEMACHER:
            z0 = 1.0 - 2.0 * ((w0 >> 31) & 1).to(tl.float32)
            z1 = 1.0 - 2.0 * ((w1 >> 31) & 1).to(tl.float32)
            z2 = 1.0 - 2.0 * ((w2 >> 31) & 1).to(tl.float32)
            z3 = 1.0 - 2.0 * ((w3 >> 31) & 1).to(tl.float32)
        else:
            u0, u1, u2, u3 = _uniform(w0), _uniform(w1), _uniform(w2), _uniform(w3)
            r01 = tl.sqrt(-2.0 * _ln(u0, FAST))
            r23 = tl.sqrt(-2.0 * _ln(u2, FAST))
            c1, s1 = _cos_sin_2pi(u1, FAST)
            c3, s3 = _cos_sin_2pi(u3, FAST)
            z0, z1 = r01 * c1, r01 * s1
            z2, z3 = r23 * c3, r23 * s3
        # (G, 2, 2) with [g, i, j] = z_{2i + j}: flattening gives z0, z1, z2, z3 per group
        return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (4 * groups.shape[0],))

    @triton.jit
    def _sr_uniform(seed, idx):
        """Stochastic-rounding uniforms for block element indices ``idx`` (lane = idx % 4)."""
        w0, w1, w2, w3 = tl.randint4x(seed, (idx // 4).to(tl.uint32))
        lane = idx % 4
        w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        return _uniform(w)

    @triton.jit
    def _round_stochastic(x, u, STORE_KIND: tl.constexpr):
        if STORE_KIND == 0:
            return x
        if STORE_KIND == 1:
            lo = x.to(tl.float16, fp_downcast_rounding="rtz")
            hi = (lo.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)  # one step away from 0
        else:
            lo = x.to(tl.bfloat16, fp_downcast_rounding="rtz")
            hi = (lo.to(tl.int16, bitcast=True) + 1).to(tl.bfloat16, bitcast=True)
        lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
        gap = tl.abs(hi32) - tl.abs(lo32)
        frac = tl.where(gap > 0, (tl.abs(x) - tl.abs(lo32)) / gap, 0.0)
        up = (u < frac) & (tl.abs(hi32) < float("inf"))
        return tl.where(up, hi32, lo32)

    @triton.jit(do_not_specialize=["n", "new_seed", "n_log", "key_hi", "sr_seed", "sr_offset", "group", "z_group0"])
    def _arrive_kernel(
        stored_ptr, out_ptr, plus_ptr, minus_ptr, n, new_seed, eps,
        seeds_ptr, grads_ptr, lrs_ptr, wds_ptr, n_log, key_hi, sr_seed, sr_offset, scales_ptr, group, z_group0,
        DECAY: tl.constexpr, WRITE: tl.constexpr, MINUS: tl.constexpr, STORE_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
        RADEMACHER: tl.constexpr, GROUPS: tl.constexpr, PERTURB: tl.constexpr, FAST_Z: tl.constexpr,
    ):
        pid = tl.program_id(0)
        groups = z_group0 + pid.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # (G,) Philox groups of the parameter
        idx = pid.to(tl.int64) * (4 * GROUPS) + tl.arange(0, 4 * GROUPS)  # (4G,) element indices
        mask = idx < n
        theta = tl.load(stored_ptr + idx, mask=mask, other=0).to(tl.float32)
        if STORE_KIND == 3:  # int8: one fp32 scale per `group` elements of the flat block
            theta = theta * tl.load(scales_ptr + (idx + sr_offset) // group, mask=mask, other=0.0)
        for k in range(n_log):
            z = _z4(key_hi | tl.load(seeds_ptr + k), groups.to(tl.uint32), RADEMACHER, FAST_Z)
            g = tl.load(grads_ptr + k)
            lr = tl.load(lrs_ptr + k)
            if DECAY:
                wd = tl.load(wds_ptr + k)
                theta = theta - lr * (g * z + wd * theta)
            else:
                theta = theta - lr * (g * z)
        if WRITE:
            u = _sr_uniform(sr_seed, idx + sr_offset)
            tl.store(out_ptr + idx, _round_stochastic(theta, u, OUT_KIND).to(out_ptr.dtype.element_ty), mask=mask)
        if PERTURB:
            z = _z4(new_seed, groups.to(tl.uint32), RADEMACHER, FAST_Z)
            tl.store(plus_ptr + idx, (theta + eps * z).to(plus_ptr.dtype.element_ty), mask=mask)
            if MINUS:
                tl.store(minus_ptr + idx, (theta - eps * z).to(minus_ptr.dtype.element_ty), mask=mask)
        else:  # eps = 0 (evaluation, int8 write-backs, flushes): θ itself, no z drawn
            tl.store(plus_ptr + idx, theta.to(plus_ptr.dtype.element_ty), mask=mask)
            if MINUS:
                tl.store(minus_ptr + idx, theta.to(minus_ptr.dtype.element_ty), mask=mask)


_ENCODE_GROUPS = 8  # int8 groups (of `group` elements) per program of the encoder


def encode_int8(
    src: torch.Tensor,
    q_out: torch.Tensor,
    scales_out: torch.Tensor,
    prev_scales: torch.Tensor | None,
    *,
    sr_seed: int,
    sr_key: int,
    offset: int,
    group: int = 128,
) -> None:
    """int8-encode fp32 ``src`` (whole groups but the last) in one kernel: the bytes of
    :func:`zo2tier.tiers.codec._encode_int8` with the stochastic-rounding uniforms of
    ``sr_uniform(sr_seed, sr_key, n, offset=offset)`` (the same Philox words, drawn in registers).

    Group scales: a fresh absmax / 127 rounded up to 17 significant bits, or with ``prev_scales`` the stored
    scale while the group's absmax stays in [119, 127] × it, else one placing the absmax mid-band."""
    n = src.numel()
    if n == 0:
        return
    n_groups = (n + group - 1) // group
    if q_out.numel() != n or scales_out.numel() != n_groups or group & (group - 1):
        raise ValueError(f"encode_int8: {n} elements need {n} int8 outputs and {n_groups} scales "
                         f"(got {q_out.numel()} and {scales_out.numel()}); group {group} must be a power of two")
    grid = (triton.cdiv(n_groups, _ENCODE_GROUPS),)
    _encode_int8_kernel[grid](
        src, q_out, scales_out, prev_scales if prev_scales is not None else scales_out, n, n_groups,
        ((sr_key | _SR_DOMAIN) << 32) | sr_seed, offset,
        HAS_PREV=prev_scales is not None, GROUP=group, BG=_ENCODE_GROUPS, enable_fp_fusion=False,
    )


if triton is not None:

    @triton.jit
    def _ceil_scale(x):
        """Round positive fp32 up to 17 significant bits (exact products with 7-bit integers)."""
        bits = x.to(tl.int32, bitcast=True)
        return ((bits + 0x7F) & ~0x7F).to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=["n", "n_groups", "sr_seed", "offset"])
    def _encode_int8_kernel(src_ptr, q_ptr, scales_ptr, prev_ptr, n, n_groups, sr_seed, offset,
                            HAS_PREV: tl.constexpr, GROUP: tl.constexpr, BG: tl.constexpr):
        pid = tl.program_id(0)
        g = pid.to(tl.int64) * BG + tl.arange(0, BG)  # (BG,) groups of this program
        idx = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (BG, GROUP) element indices
        mask = idx < n
        x = tl.load(src_ptr + idx, mask=mask, other=0.0)  # padding is 0, as the torch codec pads
        absmax = tl.max(tl.abs(x), axis=1)
        scale = _ceil_scale(absmax / 127.0)
        if HAS_PREV:
            prev = tl.load(prev_ptr + g, mask=g < n_groups, other=0.0)
            keep = (absmax <= prev * 127.0) & (absmax >= prev * 119.0) & (prev > 0)
            scale = tl.where(keep, prev, _ceil_scale(absmax / 123.03125))  # 127 · (1 − 1/32): mid-band
        scale = tl.where(scale > 0, scale, 1.0)
        scaled = x / scale[:, None]
        q = tl.floor(scaled)
        u = _sr_uniform(sr_seed, idx + offset)
        q = q + tl.where(u < scaled - q, 1.0, 0.0)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + idx, q.to(tl.int8), mask=mask)
        tl.store(scales_ptr + g, scale, mask=g < n_groups)
