"""Fused perturbation and update of one flat parameter, with z regenerated from its key.

Both functions read and write a parameter once and never hold more than one chunk of z:

- :func:`perturb_into`: ``out = θ + scale·z`` (θ any float dtype, ``out`` any float dtype);
- :func:`apply_update_`: ``θ ← θ − lr·(g·z + wd·θ)`` in place on float32 θ.

The floating-point op order is part of the contract (bit-exact replay on every tier depends on
it). With ``f32(x)`` the float32 nearest to the float64 ``x`` and every op rounded to float32:

- perturb: ``out = cast_out(f32(θ) + f32(scale) * z)``;
- update:  ``d = f32(lr * g) * z``; if ``wd != 0``: ``d = d + f32(lr * wd) * θ``; ``θ = θ - d``
  (``lr * g`` and ``lr * wd`` are products of Python floats, i.e. float64, rounded once).

No step is ever fused into an FMA: the CPU path runs one torch op per step, the torch-on-CUDA
path is the same code, and the Triton path (CUDA with Triton) is launched with
``enable_fp_fusion=False``. z is bit-identical on all paths (see ``docs/rng.md``).

Where Triton imports, the device functions ``z_lanes(seed, groups, RADEMACHER)`` and
``uniform(word)`` are exported for other Triton kernels that need the same z.

>>> theta = torch.zeros(6)
>>> out = perturb_into(theta, torch.empty(6), step_seed=1, param_id=0, scale=1.0)
>>> torch.equal(out, rng.normal(1, 0, 6))
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zo2tier.zo import rng

__all__ = ["apply_update_", "perturb_into"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_flat(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} has shape {tuple(t.shape)}; pass a flat contiguous view (t.view(-1))")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {t.dtype}; pass one of {_FLOATS}")


def _check_finite(**values: float) -> None:
    for name, v in values.items():
        if not math.isfinite(v):
            raise ValueError(f"{name}={v} is not finite; skip this step instead (was the loss NaN?)")


def _check_key(step_seed: int, param_id: int, kind: str) -> None:
    rng.check_u32("step_seed", step_seed)
    rng.check_u32("param_id", param_id)
    rng.check_kind(kind)


def perturb_into(
    theta: Tensor, out: Tensor, *, step_seed: int, param_id: int, scale: float, kind: str = "gaussian"
) -> Tensor:
    """Write ``θ + scale·z`` into ``out`` (same numel, any float dtypes, same device); returns ``out``.

    z is ``rng.normal(step_seed, param_id, θ.numel(), kind=kind)``; θ is never modified.
    """
    _check_flat("theta", theta)
    _check_flat("out", out)
    if out.numel() != theta.numel() or out.device != theta.device:
        raise ValueError(
            f"out ({out.numel()} on {out.device}) must match theta ({theta.numel()} on {theta.device}); "
            "allocate out like theta"
        )
    _check_key(step_seed, param_id, kind)
    rng.check_range(theta.numel(), 0)
    _check_finite(scale=scale)
    if _triton_ready(theta):
        _triton_perturb(theta, out, _seed64(step_seed, param_id), rng.f32(scale), kind)
        return out
    s = rng.f32(scale)
    for lo, z in rng.chunks(
        theta.numel(), k0=step_seed, k1=param_id, offset=0, kind=kind, device=theta.device
    ):
        hi = lo + z.numel()
        z.mul_(s).add_(theta[lo:hi].to(torch.float32))  # f32(θ) + s*z  (z is chunk scratch)
        out[lo:hi].copy_(z)  # round to out's dtype, nearest-even
    return out


def apply_update_(
    theta: Tensor,
    *,
    step_seed: int,
    param_id: int,
    lr: float,
    projected_grad: float,
    weight_decay: float,
    kind: str = "gaussian",
) -> Tensor:
    """In place on flat float32 θ: ``θ ← θ − lr·(projected_grad·z + weight_decay·θ)``; returns θ."""
    _check_flat("theta", theta)
    if theta.dtype != torch.float32:
        raise TypeError(f"theta has dtype {theta.dtype}; updates run on float32 master weights")
    _check_key(step_seed, param_id, kind)
    rng.check_range(theta.numel(), 0)
    _check_finite(lr=lr, projected_grad=projected_grad, weight_decay=weight_decay)
    cz, ct = rng.f32(lr * projected_grad), rng.f32(lr * weight_decay)
    if _triton_ready(theta):
        _triton_update(theta, _seed64(step_seed, param_id), cz, ct, weight_decay != 0.0, kind)
        return theta
    for lo, z in rng.chunks(
        theta.numel(), k0=step_seed, k1=param_id, offset=0, kind=kind, device=theta.device
    ):
        th = theta[lo : lo + z.numel()]
        d = z.mul_(cz)
        if weight_decay != 0.0:
            d.add_(th * ct)
        th.sub_(d)
    return theta


# ----------------------------------------------------------------------------- CUDA + Triton


def _seed64(step_seed: int, param_id: int) -> int:
    """Triton's 64-bit Philox seed: key word k0 is its low half, k1 its high half."""
    return (param_id << 32) | step_seed


def _triton_ready(t: Tensor) -> bool:
    """True when ``t`` is on CUDA and Triton imported."""
    return t.device.type == "cuda" and triton is not None


_KIND_CODE = {"gaussian": 0, "rademacher": 1}
_BLOCK_GROUPS = 512  # 2048 elements per program


def _grid(numel: int) -> tuple[int]:
    return (max(1, -(-numel // (4 * _BLOCK_GROUPS))),)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves CUDA too
    triton = None

if triton is not None:
    # The same constants and the same op order as rng._ln / rng._sqrt / rng._sincos_2pi.
    U_SCALE = tl.constexpr(rng.U_SCALE)
    _TWO_PI = tl.constexpr(rng.TWO_PI_F32)
    LN2_HI = tl.constexpr(rng.LN2_HI)
    LN2_LO = tl.constexpr(rng.LN2_LO)
    SQRT_HALF_BITS = tl.constexpr(rng.SQRT_HALF_BITS)
    SIGN_BIT = tl.constexpr(rng.SIGN_BIT)
    _A9, _A7, _A5, _A3 = (tl.constexpr(c) for c in rng.ATANH)
    _S9, _S7, _S5, _S3 = (tl.constexpr(c) for c in rng.SIN)
    _C10, _C8, _C6, _C4, _C2 = (tl.constexpr(c) for c in rng.COS)
    _MAGIC = tl.constexpr(rng.RSQRT_MAGIC)

    @triton.jit
    def uniform(w):
        """Triton device function: ``((w >> 9) + 0.5) * 2**-23`` of a Philox word (exact)."""
        return ((w.to(tl.uint32, bitcast=True) >> 9).to(tl.float32) + 0.5) * U_SCALE

    @triton.jit
    def _ln(u):
        ix = u.to(tl.int32, bitcast=True) + (0x3F800000 - SQRT_HALF_BITS)
        ef = ((ix >> 23) - 127).to(tl.float32)
        m = ((ix & 0x007FFFFF) + SQRT_HALF_BITS).to(tl.float32, bitcast=True)
        t = tl.div_rn(m - 1.0, m + 1.0)
        t2 = t * t
        h = ((t2 * _A9 + _A7) * t2 + _A5) * t2 + _A3
        ln_m = (t + t * (h * t2)) * 2.0
        return (ef * LN2_LO + ln_m) + ef * LN2_HI

    @triton.jit
    def _sqrt(v):
        y = (_MAGIC - (v.to(tl.int32, bitcast=True) >> 1)).to(tl.float32, bitcast=True)
        half_v = v * 0.5
        y = y * (1.5 - half_v * (y * y))
        y = y * (1.5 - half_v * (y * y))
        y = y * (1.5 - half_v * (y * y))
        return v * y

    @triton.jit
    def _sincos_2pi(u):
        q = (u * 4.0 + 0.5).to(tl.int32)
        x = (u - q.to(tl.float32) * 0.25) * _TWO_PI
        x2 = x * x
        s = x + x * ((((x2 * _S9 + _S7) * x2 + _S5) * x2 + _S3) * x2)
        c = ((((x2 * _C10 + _C8) * x2 + _C6) * x2 + _C4) * x2 + _C2) * x2 + 1.0
        swap = -(q & 1)
        sb = s.to(tl.int32, bitcast=True)
        cb = c.to(tl.int32, bitcast=True)
        diff = (sb ^ cb) & swap
        sin_q = (sb ^ diff) ^ (-((q >> 1) & 1) & SIGN_BIT)
        cos_q = (cb ^ diff) ^ (-(((q + 1) >> 1) & 1) & SIGN_BIT)
        return cos_q.to(tl.float32, bitcast=True), sin_q.to(tl.float32, bitcast=True)

    @triton.jit
    def _sign(u):
        neg = (0x3EFFFFFF - u.to(tl.int32, bitcast=True)) >> 31
        return ((neg & SIGN_BIT) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def z_lanes(seed, groups, RADEMACHER: tl.constexpr):
        """Triton device function: the 4 z lanes of counter groups ``groups`` (uint32 tensor).

        ``seed`` is ``(param_id << 32) | step_seed``. Lane j of group g is element ``4 g + j`` of
        ``rng.normal(step_seed, param_id, ...)``, bit for bit, provided the calling kernel is
        launched with ``enable_fp_fusion=False``. Other kernels (e.g. a fused replay) may call it.
        """
        w0, w1, w2, w3 = tl.randint4x(seed, groups)
        u0, u1, u2, u3 = uniform(w0), uniform(w1), uniform(w2), uniform(w3)
        if RADEMACHER:
            z0, z1, z2, z3 = _sign(u0), _sign(u1), _sign(u2), _sign(u3)
        else:
            r01 = _sqrt(_ln(u0) * -2.0)
            r23 = _sqrt(_ln(u2) * -2.0)
            c1, s1 = _sincos_2pi(u1)
            c3, s3 = _sincos_2pi(u3)
            z0, z1, z2, z3 = r01 * c1, r01 * s1, r23 * c3, r23 * s3
        return z0, z1, z2, z3

    @triton.jit
    def _z(seed, pid, KIND: tl.constexpr, BLOCK: tl.constexpr):
        """z of groups pid*BLOCK .. + BLOCK, flattened to element order (4*BLOCK,)."""
        g = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.uint32)
        z0, z1, z2, z3 = z_lanes(seed, g, KIND == 1)
        # join(join(z0, z2), join(z1, z3))[i, l, k] = z_{2l+k}[i]: row-major order is element order
        return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * BLOCK])

    @triton.jit
    def _perturb_kernel(theta_ptr, out_ptr, numel, seed, scale, KIND: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        z = _z(seed, pid, KIND, BLOCK)
        e = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
        mask = e < numel
        x = tl.load(theta_ptr + e, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + e, (x + z * scale).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _update_kernel(
        theta_ptr, numel, seed, cz, ct, HAS_WD: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0).to(tl.int64)
        z = _z(seed, pid, KIND, BLOCK)
        e = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
        mask = e < numel
        x = tl.load(theta_ptr + e, mask=mask, other=0.0)
        d = z * cz
        if HAS_WD:
            d = d + x * ct
        tl.store(theta_ptr + e, x - d, mask=mask)


def _triton_perturb(theta: Tensor, out: Tensor, seed: int, scale: float, kind: str) -> None:
    with torch.cuda.device(theta.device):
        _perturb_kernel[_grid(theta.numel())](
            theta, out, theta.numel(), seed, scale,
            KIND=_KIND_CODE[kind], BLOCK=_BLOCK_GROUPS, enable_fp_fusion=False,
        )  # fmt: skip


def _triton_update(theta: Tensor, seed: int, cz: float, ct: float, has_wd: bool, kind: str) -> None:
    with torch.cuda.device(theta.device):
        _update_kernel[_grid(theta.numel())](
            theta, theta.numel(), seed, cz, ct,
            HAS_WD=has_wd, KIND=_KIND_CODE[kind], BLOCK=_BLOCK_GROUPS, enable_fp_fusion=False,
        )  # fmt: skip
