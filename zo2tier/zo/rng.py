"""Keyed perturbation RNG: Philox4x32-10 exactly as Triton's ``tl.randint4x`` computes it.

z for a parameter is a pure function of ``(step_seed, param_id, element index)``, so it can be
regenerated in any order, on any tier and on any device. The full contract (formulas, golden
vectors, measured speed) is in ``docs/rng.md``; in short:

- key: ``k0 = step_seed``, ``k1 = param_id`` (Triton's ``seed64 = (param_id << 32) | step_seed``);
- element ``i`` (flat, row-major) uses counter ``(i // 4, 0, 0, 0)`` and output word ``i % 4``;
- word -> uniform: ``u = ((w >> 9) + 0.5) * 2**-23``, exact in float32, strictly inside (0, 1);
- gaussian: Box-Muller over word pairs (0, 1) and (2, 3); rademacher: ``1 - 2 * bit31(w)``.

Box-Muller's ln, sqrt, cos and sin are written here from IEEE-exact float32 operations in a
fixed order, so z has the same bits on every backend that does not contract to FMA: eager CPU,
``torch.compile`` CPU, torch on CUDA and the Triton kernels of ``kernels.py``.

>>> z = normal(step_seed(seed=0, step=3), param_id=5, numel=10)
>>> z.shape, z.dtype
(torch.Size([10]), torch.float32)

Speed: values are made in chunks of 2**16 counter groups. The eager path runs the Philox rounds
in place on reused buffers. Once a process has generated 2**26 elements on the CPU, the chunk
kernel is compiled with ``torch.compile`` (one fused C++ loop), used only if it reproduces the
eager values bit for bit; ``ZO2TIER_NO_COMPILE=1`` disables it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "normal", "philox4x32_10", "sr_uniform", "step_seed"]

KINDS = ("gaussian", "rademacher")

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_ROUND_A = 0xD2511F53  # multiplies c0
_ROUND_B = 0xCD9E8D57  # multiplies c2
_KEY_A = 0x9E3779B9  # added to k0 after each round
_KEY_B = 0xBB67AE85  # added to k1 after each round
_N_ROUNDS = 10
_SR_DOMAIN = 0x80000000  # k1 bit 31: stochastic-rounding uniforms never collide with z

_U_SHIFT = 9  # keep the top 23 bits of a word ...
U_SCALE = 2.0**-23  # ... so ((w >> 9) + 0.5) * 2**-23 is exact in float32
TWO_PI_F32 = float(torch.tensor(2 * math.pi, dtype=torch.float32))  # 6.2831854820251465 exactly

_MAX_GROUPS = 1 << 32  # the Philox counter word c0 is 32 bits
_CHUNK_GROUPS = {"cpu": 1 << 16, "cuda": 1 << 20}  # 1 MiB of float32 uniforms per CPU chunk

IntOrTensor = int | Tensor


# ----------------------------------------------------------------------------- validation


def check_u32(name: str, value: int, *, limit: int = 1 << 32) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [0, {limit}); got {value!r} ({type(value).__name__})")
    if not 0 <= value < limit:
        hint = "use param_id < 2**31 for stochastic-rounding keys" if limit == 1 << 31 else "mask it"
        raise ValueError(f"{name}={value} is outside [0, {limit}); {hint} (e.g. {name} & {limit - 1:#x})")


def check_range(numel: int, offset: int) -> None:
    for name, v in (("numel", numel), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a non-negative int; got {v!r} ({type(v).__name__})")
        if v < 0:
            raise ValueError(f"{name}={v} is negative; pass a count/index >= 0")
    if offset + numel > 4 * _MAX_GROUPS:
        raise ValueError(
            f"offset + numel = {offset + numel} exceeds 2**34 elements, the span of one Philox key; "
            "split the parameter under several param_ids"
        )


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}; pass kind='gaussian' or kind='rademacher'")


# ----------------------------------------------------------------------------- public spec


def step_seed(seed: int, step: int) -> int:
    """Derive a step's uint32 seed: low 32 bits of splitmix64(``(seed << 32) | step``).

    splitmix64(x): ``z = x + 0x9E3779B97F4A7C15``; ``z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9``;
    ``z = (z ^ z >> 27) * 0x94D049BB133111EB``; ``z ^ z >> 31`` (all mod 2**64).

    >>> step_seed(0, 0)
    2065550767
    """
    check_u32("seed", seed)
    check_u32("step", step)
    z = (((seed << 32) | step) + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & _M32


def _philox_rounds(
    c0: IntOrTensor, c1: IntOrTensor, c2: IntOrTensor, c3: IntOrTensor, k0: IntOrTensor, k1: IntOrTensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ten Philox rounds on int64 tensors holding uint32 values (functional; also compiled)."""
    for _ in range(_N_ROUNDS):
        p0 = c0 * _ROUND_A  # int64 product wraps mod 2**64: low 64 bits of the 32x32 product
        p1 = c2 * _ROUND_B
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0 & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3  # type: ignore[return-value]


def philox4x32_10(
    c0: IntOrTensor, c1: IntOrTensor, c2: IntOrTensor, c3: IntOrTensor, k0: int, k1: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Random123) of counter ``(c0, c1, c2, c3)`` under key ``(k0, k1)``.

    Counters are ints or int64 tensors holding uint32 values (they broadcast); returns four
    int64 tensors of uint32 values. Matches Random123's known-answer vectors.

    >>> [hex(int(w)) for w in philox4x32_10(0, 0, 0, 0, 0, 0)]
    ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    check_u32("k0", k0)
    check_u32("k1", k1)
    words = []
    for name, c in (("c0", c0), ("c1", c1), ("c2", c2), ("c3", c3)):
        if isinstance(c, Tensor):
            if c.dtype != torch.int64:
                raise TypeError(f"{name} has dtype {c.dtype}; pass an int64 tensor holding uint32 values")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) > _M32):
                raise ValueError(f"{name} holds values outside [0, 2**32); mask it with & 0xFFFFFFFF")
        else:
            check_u32(name, c)
            c = torch.tensor(c, dtype=torch.int64)
        words.append(c)
    shape = torch.broadcast_shapes(*(w.shape for w in words))
    words = [w.expand(shape) for w in words]
    return _philox_rounds(*words, k0, k1)


# ----------------------------------------------------------------------------- float32 math
#
# Box-Muller needs ln, sqrt, cos and sin. Library versions differ in the last bit between MKL
# (eager CPU), SLEEF (torch.compile), libdevice (Triton) and CUDA, so z is built only from
# IEEE-exact operations (+, -, *, /, int<->float, bit casts, selects) in a fixed order. Any
# backend that does not fuse a*b+c into an FMA then computes the same bits.


def f32(x: float) -> float:
    """x rounded to the nearest float32 (so every backend multiplies by the same constant)."""
    return float(torch.tensor(x, dtype=torch.float32))


LN2_HI = 0.693145751953125  # 0x3F317200: e * LN2_HI is exact for |e| < 512
LN2_LO = f32(math.log(2.0) - LN2_HI)
SQRT_HALF_BITS = 0x3F3504F3  # float32 sqrt(1/2)
SIGN_BIT = -(2**31)  # 0x80000000 as int32
ATANH = [f32(1.0 / k) for k in (9, 7, 5, 3)]  # ln m = 2 atanh(t) = 2 (t + t^3/3 + ... + t^9/9)
SIN = [f32((-1) ** k / math.factorial(2 * k + 1)) for k in (4, 3, 2, 1)]  # x^9 .. x^3
COS = [f32((-1) ** k / math.factorial(2 * k)) for k in (5, 4, 3, 2, 1)]  # x^10 .. x^2
RSQRT_MAGIC = 0x5F3759DF


def _horner(x: Tensor, coeffs: list) -> Tensor:
    """((c0 * x + c1) * x + ...) * x + c_last, one rounding per op."""
    acc = x * coeffs[0]
    for c in coeffs[1:-1]:
        acc = (acc + c) * x
    return acc + coeffs[-1]


def _ln(u: Tensor) -> Tensor:
    """Natural log of positive normal float32 values (error about 1 ulp)."""
    # u = 2**e * m with m in [sqrt(1/2), sqrt(2)): offsetting the bits puts the split at sqrt(1/2)
    ix = u.view(torch.int32) + (0x3F800000 - SQRT_HALF_BITS)
    ef = ((ix >> 23) - 127).to(torch.float32)
    m = ((ix & 0x007FFFFF) + SQRT_HALF_BITS).view(torch.float32)
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    ln_m = (t + t * (_horner(t2, ATANH) * t2)) * 2.0
    return (ef * LN2_LO + ln_m) + ef * LN2_HI


def _sqrt(v: Tensor) -> Tensor:
    """Square root of positive float32 values: bit-trick guess, three Newton steps on 1/sqrt(v)."""
    y = (RSQRT_MAGIC - (v.view(torch.int32) >> 1)).view(torch.float32)
    half_v = v * 0.5
    for _ in range(3):
        y = y * (1.5 - half_v * (y * y))
    return v * y


def _sincos_2pi(u: Tensor) -> tuple[Tensor, Tensor]:
    """(cos 2 pi u, sin 2 pi u) for u in [0, 1): exact quarter-turn reduction, then Taylor on [-pi/4, pi/4]."""
    q = (u * 4.0 + 0.5).to(torch.int32)  # nearest quarter turn, 0..4
    x = (u - q.to(torch.float32) * 0.25) * TWO_PI_F32  # the subtraction is exact
    x2 = x * x
    s = x + x * (_horner(x2, SIN) * x2)
    c = _horner(x2, COS) * x2 + 1.0
    # select and negate on the bits (exact, and much cheaper than torch.where):
    # odd q swaps sin and cos; bit 1 of q negates sin, bit 1 of q + 1 negates cos
    swap = -(q & 1)  # 0 or all ones
    sb, cb = s.view(torch.int32), c.view(torch.int32)
    diff = (sb ^ cb) & swap
    sin_q = (sb ^ diff) ^ (-((q >> 1) & 1) & SIGN_BIT)
    cos_q = (cb ^ diff) ^ (-(((q + 1) >> 1) & 1) & SIGN_BIT)
    return cos_q.view(torch.float32), sin_q.view(torch.float32)


def _interleave(lanes: Tensor) -> Tensor:
    """(4, G) lane-major -> (G, 4) element order (element 4 g + j is lane j of group g)."""
    return torch.stack([lanes[0], lanes[1], lanes[2], lanes[3]], dim=1)


def _gaussian_lanes(u: Tensor) -> Tensor:
    """Box-Muller on lane pairs (0, 1) and (2, 3) of (4, G) uniforms; returns (4, G) normals."""
    r = _sqrt(_ln(u[0::2]) * -2.0)  # (2, G): radii from lanes 0 and 2
    cos_t, sin_t = _sincos_2pi(u[1::2])  # (2, G): angles from lanes 1 and 3
    zc, zs = r * cos_t, r * sin_t  # zc = (z0, z2), zs = (z1, z3)
    return torch.stack([zc[0], zs[0], zc[1], zs[1]])


def _rademacher_lanes(u: Tensor) -> Tensor:
    """1 - 2 * bit31(w), from the uniforms ``u`` of the words (any shape).

    bit31(w) is set exactly when u >= 0.5, i.e. when bits(u) >= 0x3F000000; the sign bit of
    ``0x3EFFFFFF - bits(u)`` says so, and becomes the sign of 1.0.
    """
    neg = (0x3EFFFFFF - u.view(torch.int32)) >> 31  # -1 or 0
    return ((neg & SIGN_BIT) | 0x3F800000).view(torch.float32)


_KIND_IDS = {"gaussian": 0, "rademacher": 1, "uniform": 2}
_LANES = {"gaussian": _gaussian_lanes, "rademacher": _rademacher_lanes, "uniform": lambda u: u}


# ----------------------------------------------------------------------------- chunk kernels


def _values_kernel(groups: Tensor, k0: Tensor, k1: Tensor, kind_id: Tensor) -> Tensor:
    """All-in-one chunk kernel for ``torch.compile``: counters ``(g, 0, 0, 0)`` -> (G, 4) values.

    Same elementwise ops as the eager path, written per lane so that the compiler fuses Philox,
    Box-Muller and the interleaved store into one loop; every kind is computed and ``kind_id``
    selects, so one compiled graph serves all of them.
    """
    zero = torch.zeros_like(groups)
    words = _philox_rounds(groups, zero, zero, zero, k0, k1)
    u = [((w >> _U_SHIFT).to(torch.float32) + 0.5) * U_SCALE for w in words]  # 4 x (G,)
    r01, r23 = _sqrt(_ln(u[0]) * -2.0), _sqrt(_ln(u[2]) * -2.0)
    (c1, s1), (c3, s3) = _sincos_2pi(u[1]), _sincos_2pi(u[3])
    gauss = (r01 * c1, r01 * s1, r23 * c3, r23 * s3)
    lanes = [
        torch.where(kind_id == 0, gauss[j], torch.where(kind_id == 1, _rademacher_lanes(u[j]), u[j]))
        for j in range(4)
    ]
    return torch.stack(lanes, dim=1)


class _Workspace:
    """Reused buffers for the eager path (Philox words, uniforms), one set per thread and device."""

    def __init__(self, n_groups: int, device: torch.device) -> None:
        self.n_groups = n_groups
        self.ints = torch.empty(6, n_groups, dtype=torch.int64, device=device)
        self.uniform = torch.empty(4, n_groups, dtype=torch.float32, device=device)
        self.arange = torch.arange(n_groups, dtype=torch.int64, device=device)


_local = threading.local()


def _workspace(device: torch.device) -> _Workspace:
    spaces: dict = _local.__dict__.setdefault("spaces", {})
    key = str(device)
    if key not in spaces:
        spaces[key] = _Workspace(_CHUNK_GROUPS.get(device.type, _CHUNK_GROUPS["cuda"]), device)
    return spaces[key]


def _words_eager(g0: int, n_groups: int, k0: int, k1: int, ws: _Workspace) -> tuple[Tensor, ...]:
    """Same words as :func:`_philox_rounds`, in place on reused buffers (10 ops per round)."""
    c0, c1, c2, c3, p0, p1 = (b[:n_groups] for b in ws.ints)
    torch.add(ws.arange[:n_groups], g0, out=c0)
    c1.zero_(), c2.zero_(), c3.zero_()
    for _ in range(_N_ROUNDS):
        torch.mul(c0, _ROUND_A, out=p0)
        torch.mul(c2, _ROUND_B, out=p1)
        torch.bitwise_right_shift(p1, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_M32)
        torch.bitwise_right_shift(p0, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_M32)
        c1, p1 = p1, c1  # new c1 = p1; its high bits are junk until the final mask
        c3, p0 = p0, c3
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1.bitwise_and_(_M32), c2, c3.bitwise_and_(_M32)


def _values_eager(g0: int, n_groups: int, k0: int, k1: int, kind: str, ws: _Workspace) -> Tensor:
    """(n_groups, 4) values of counters ``g0 ..`` without the compiler.

    The uniforms are made in place; every step is exact, so they equal the compiled kernel's.
    """
    u = ws.uniform[:, :n_groups]
    for j, w in enumerate(_words_eager(g0, n_groups, k0, k1, ws)):
        u[j].copy_(w.bitwise_right_shift_(_U_SHIFT))  # < 2**23: the int -> float32 copy is exact
    return _interleave(_LANES[kind](u.add_(0.5).mul_(U_SCALE)))


_compile_lock = threading.Lock()
_compiled: Callable[..., Tensor] | None = None
_compile_tried = False
_eager_numel = 0  # CPU elements generated eagerly so far in this process
_COMPILE_AFTER_NUMEL = 1 << 26  # compile only once a process has shown it needs volume (~1 s eager)


def _call_compiled(fn: Callable[..., Tensor], g0: int, n_groups: int, k0: int, k1: int, kind: str) -> Tensor:
    padded = max(8, -(-n_groups // 8) * 8)  # keep dynamic shapes away from the 0/1 specializations
    # grad and inference mode are part of the compile guards: pin them so nothing recompiles
    with torch.inference_mode(False), torch.no_grad():
        groups = torch.arange(g0, g0 + padded, dtype=torch.int64)
        torch._dynamo.mark_dynamic(groups, 0)  # one graph for every chunk length
        out = fn(groups, torch.tensor(k0), torch.tensor(k1), torch.tensor(_KIND_IDS[kind]))
    return out[:n_groups]


def _verify(fn: Callable[..., Tensor]) -> bool:
    """True iff ``fn`` reproduces the eager values bit for bit on a spread of keys, counters and kinds.

    The first call uses a full chunk: the compiler sizes its loops (threads, vector width) from it.
    """
    n_full = _CHUNK_GROUPS["cpu"]
    ws = _Workspace(n_full, torch.device("cpu"))
    cases = ((12345, 7, 1000, n_full), (0, 0, 0, 5), (_M32, _M32, _MAX_GROUPS - 4096, 4096))
    for k0, k1, g0, n in cases:
        for kind in _KIND_IDS:
            got = _call_compiled(fn, g0, n, k0, k1, kind)
            if not torch.equal(got, _values_eager(g0, n, k0, k1, kind, ws)):
                logger.debug("zo2tier rng: compiled %s values differ at key (%d, %d)", kind, k0, k1)
                return False
    return True


_compile_allowed = True


def set_compile(enabled: bool) -> None:
    """Allow (default) or forbid compiling the CPU Philox kernel in this process. Both give the same values;
    forbidding it saves the one-off compile in short-lived processes (e.g. the data-parallel tests' ranks).
    Call it before the first large draw."""
    global _compile_allowed
    _compile_allowed = bool(enabled)


def _compiled_kernel() -> Callable[..., Tensor] | None:
    """The compiled CPU chunk kernel, or None; compiled and verified at most once per process."""
    global _compiled, _compile_tried
    if _compile_tried:
        return _compiled
    with _compile_lock:
        if _compile_tried:
            return _compiled
        if not _compile_allowed:
            logger.debug("zo2tier rng: compiling is off (set_compile(False)); using the eager path")
        else:
            start_s = time.perf_counter()
            try:
                fn = torch.compile(_values_kernel)
                ok = _verify(fn)
                _compiled = fn if ok else None
                logger.debug(
                    "zo2tier rng: compiled kernel %s after %.1f s",
                    "enabled" if ok else "differs from eager; disabled",
                    time.perf_counter() - start_s,
                )
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: stay eager
                logger.debug("zo2tier rng: torch.compile failed (%s); using the eager path", exc)
        _compile_tried = True
    return _compiled


def _values(g0: int, n_groups: int, k0: int, k1: int, kind: str, ws: _Workspace) -> Tensor:
    """(n_groups, 4) float32 values (element order) of counters ``g0 .. g0 + n_groups - 1``.

    CPU work runs eagerly until this process has generated ``_COMPILE_AFTER_NUMEL`` elements;
    then the compiled kernel takes over (short runs and tests never pay the compile time).
    """
    global _eager_numel
    fn = None
    if ws.ints.device.type == "cpu" and (_compile_tried or _eager_numel >= _COMPILE_AFTER_NUMEL):
        fn = _compiled_kernel()
    if fn is None:
        _eager_numel += 4 * n_groups
        return _values_eager(g0, n_groups, k0, k1, kind, ws)
    return _call_compiled(fn, g0, n_groups, k0, k1, kind)


def chunks(
    numel: int, *, k0: int, k1: int, offset: int, kind: str, device: torch.device
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(lo, values)``: flat float32 values ``offset + lo ..`` of key ``(k0, k1)``, chunk by chunk.

    Each ``values`` is fresh scratch (at most one chunk, 2**18 elements on the CPU) that the
    caller may overwrite.
    """
    ws = _workspace(device)
    first, end = offset, offset + numel
    g = first // 4
    while 4 * g < end:
        n = min(ws.n_groups, (end + 3) // 4 - g)
        flat = _values(g, n, k0, k1, kind, ws).view(-1)
        lo, hi = max(4 * g, first), min(4 * (g + n), end)
        yield lo - first, flat[lo - 4 * g : hi - 4 * g]
        g += n


def normal(
    step_seed: int,
    param_id: int,
    numel: int,
    *,
    offset: int = 0,
    device: str | torch.device = "cpu",
    kind: str = "gaussian",
) -> Tensor:
    """z[offset : offset + numel] of parameter ``param_id`` at ``step_seed``, float32.

    kind="gaussian" gives N(0, 1) samples (Box-Muller); kind="rademacher" gives +-1 signs.

    >>> z = normal(7, 3, 6)
    >>> torch.equal(normal(7, 3, 4, offset=2), z[2:])
    True
    """
    check_u32("step_seed", step_seed)
    check_u32("param_id", param_id)
    check_range(numel, offset)
    check_kind(kind)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for lo, vals in chunks(numel, k0=step_seed, k1=param_id, offset=offset, kind=kind, device=out.device):
        out[lo : lo + vals.numel()].copy_(vals)
    return out


def sr_uniform(
    sr_seed: int, param_id: int, numel: int, *, offset: int = 0, device: str | torch.device = "cpu"
) -> Tensor:
    """Stochastic-rounding uniforms in (0, 1), float32, keyed ``k0 = sr_seed``, ``k1 = param_id | 2**31``.

    >>> u = sr_uniform(1, 2, 5)
    >>> bool(((u > 0) & (u < 1)).all())
    True
    """
    check_u32("sr_seed", sr_seed)
    check_u32("param_id", param_id, limit=1 << 31)
    check_range(numel, offset)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    k1 = param_id | _SR_DOMAIN
    for lo, vals in chunks(numel, k0=sr_seed, k1=k1, offset=offset, kind="uniform", device=out.device):
        out[lo : lo + vals.numel()].copy_(vals)
    return out
