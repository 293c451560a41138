"""Keyed perturbation RNG: Philox4x32-10 exactly as Triton's ``tl.randint4x`` computes it.

z for a parameter is a pure function of ``(step_seed, param_id, element index)``, so it can be
regenerated in any order, on any tier and on any device. The full contract (formulas, golden
vectors, measured speed) is in ``docs/rng.md``; the summary:

- key: ``k0 = step_seed``, ``k1 = param_id`` (Triton's ``seed64 = (param_id << 32) | step_seed``);
- element ``i`` (flat, row-major) uses counter ``(i // 4, 0, 0, 0)`` and output word ``i % 4``;
- word -> uniform: ``u = ((w >> 9) + 0.5) * 2**-23``, exact in float32, strictly inside (0, 1);
- gaussian: Box-Muller over word pairs (0, 1) and (2, 3); rademacher: ``1 - 2 * bit31(w)``.

>>> z = normal(step_seed(seed=0, step=3), param_id=5, numel=10)
>>> z.shape, z.dtype
(torch.Size([10]), torch.float32)

Speed: the integer Philox rounds run in cache-sized chunks, either in place with reused buffers
(eager) or as one fused loop from ``torch.compile`` (CPU only; used only when it reproduces the
eager words exactly; ``ZO2TIER_NO_COMPILE=1`` disables it). Box-Muller always runs eagerly, so
both paths give bit-identical z.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Callable, Optional, Union

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["step_seed", "philox4x32_10", "normal", "sr_uniform", "KINDS"]

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
_U_SCALE = 2.0**-23  # ... so ((w >> 9) + 0.5) * 2**-23 is exact in float32
TWO_PI_F32 = float(torch.tensor(2 * math.pi, dtype=torch.float32))  # 6.2831854820251465 exactly

_MAX_GROUPS = 1 << 32  # the Philox counter word c0 is 32 bits
_CHUNK_GROUPS = {"cpu": 1 << 16, "cuda": 1 << 20}  # 1 MiB of float32 uniforms per CPU chunk

IntOrTensor = Union[int, Tensor]


# ----------------------------------------------------------------------------- validation


def _check_u32(name: str, value: int, *, limit: int = 1 << 32) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int in [0, {limit}); got {value!r} ({type(value).__name__})")
    if not 0 <= value < limit:
        hint = "use param_id < 2**31 for stochastic-rounding keys" if limit == 1 << 31 else "mask it"
        raise ValueError(f"{name}={value} is outside [0, {limit}); {hint} (e.g. {name} & {limit - 1:#x})")


def _check_range(numel: int, offset: int) -> None:
    for name, v in (("numel", numel), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int; got {v!r}")
    if offset + numel > 4 * _MAX_GROUPS:
        raise ValueError(
            f"offset + numel = {offset + numel} exceeds 2**34 elements, the span of one Philox key; "
            "split the parameter under several param_ids"
        )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}; pass kind='gaussian' or kind='rademacher'")


# ----------------------------------------------------------------------------- public spec


def step_seed(seed: int, step: int) -> int:
    """Derive a step's uint32 seed: low 32 bits of splitmix64(``(seed << 32) | step``).

    splitmix64(x): ``z = x + 0x9E3779B97F4A7C15``; ``z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9``;
    ``z = (z ^ z >> 27) * 0x94D049BB133111EB``; ``z ^ z >> 31`` (all mod 2**64).

    >>> step_seed(0, 0)
    3793791458
    """
    _check_u32("seed", seed)
    _check_u32("step", step)
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
    _check_u32("k0", k0)
    _check_u32("k1", k1)
    words = []
    for name, c in (("c0", c0), ("c1", c1), ("c2", c2), ("c3", c3)):
        if isinstance(c, Tensor):
            if c.dtype != torch.int64:
                raise ValueError(f"{name} has dtype {c.dtype}; pass an int64 tensor holding uint32 values")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) > _M32):
                raise ValueError(f"{name} holds values outside [0, 2**32); mask it with & 0xFFFFFFFF")
        else:
            _check_u32(name, c)
            c = torch.tensor(c, dtype=torch.int64)
        words.append(c)
    shape = torch.broadcast_shapes(*(w.shape for w in words))
    words = [w.expand(shape) for w in words]
    return _philox_rounds(*words, k0, k1)


# ----------------------------------------------------------------------------- chunk kernels


def _to_uniform_(w: Tensor, out: Tensor) -> Tensor:
    """``out = ((w >> 9) + 0.5) * 2**-23`` in float32 (every step exact)."""
    torch.bitwise_right_shift(w, _U_SHIFT, out=w)
    out.copy_(w)
    return out.add_(0.5).mul_(_U_SCALE)


def _uniform_kernel(groups: Tensor, k0: Tensor, k1: Tensor) -> Tensor:
    """Functional chunk kernel for ``torch.compile``: counters ``(g, 0, 0, 0)`` -> (4, G) uniforms."""
    zero = torch.zeros_like(groups)
    words = _philox_rounds(groups, zero, zero, zero, k0, k1)
    return torch.stack([((w >> _U_SHIFT).to(torch.float32) + 0.5) * _U_SCALE for w in words])


class _Workspace:
    """Reused int64 buffers for the eager rounds and float32 buffers for the transforms."""

    def __init__(self, n_groups: int, device: torch.device) -> None:
        self.n_groups = n_groups
        self.ints = torch.empty(6, n_groups, dtype=torch.int64, device=device)
        self.uniform = torch.empty(4, n_groups, dtype=torch.float32, device=device)
        self.z = torch.empty(4, n_groups, dtype=torch.float32, device=device)
        self.flat = torch.empty(4 * n_groups, dtype=torch.float32, device=device)
        self.arange = torch.arange(n_groups, dtype=torch.int64, device=device)


_local = threading.local()


def _workspace(device: torch.device) -> _Workspace:
    spaces: dict = _local.__dict__.setdefault("spaces", {})
    key = str(device)
    if key not in spaces:
        spaces[key] = _Workspace(_CHUNK_GROUPS.get(device.type, _CHUNK_GROUPS["cuda"]), device)
    return spaces[key]


def _uniform_eager(g0: int, n_groups: int, k0: int, k1: int, ws: _Workspace) -> Tensor:
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
    c1.bitwise_and_(_M32), c3.bitwise_and_(_M32)
    u = ws.uniform[:, :n_groups]
    for j, w in enumerate((c0, c1, c2, c3)):
        _to_uniform_(w, u[j])
    return u


_compile_lock = threading.Lock()
_compiled: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None
_compile_tried = False


def _verify(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> bool:
    """True iff ``fn`` reproduces the eager uniforms bit for bit on a spread of keys and counters."""
    ws = _Workspace(1 << 12, torch.device("cpu"))
    for k0, k1, g0, n in ((0, 0, 0, 8), (12345, 7, 1000, 1000), (_M32, _M32, _MAX_GROUPS - 4096, 4096)):
        got = fn(torch.arange(g0, g0 + n), torch.tensor(k0), torch.tensor(k1))
        if not torch.equal(got, _uniform_eager(g0, n, k0, k1, ws)):
            return False
    return True


def _compiled_kernel() -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The compiled CPU chunk kernel, or None; compiled and verified at most once per process."""
    global _compiled, _compile_tried
    if _compile_tried:
        return _compiled
    with _compile_lock:
        if _compile_tried:
            return _compiled
        if os.environ.get("ZO2TIER_NO_COMPILE", "") not in ("", "0"):
            logger.debug("zo2tier rng: ZO2TIER_NO_COMPILE is set; using the eager Philox path")
        else:
            start_s = time.perf_counter()
            try:
                fn = torch.compile(_uniform_kernel, dynamic=True)
                with torch.no_grad():
                    ok = _verify(fn)
                if ok:
                    _compiled = fn
                logger.debug(
                    "zo2tier rng: compiled Philox kernel %s after %.1f s",
                    "enabled" if ok else "differs from eager; disabled",
                    time.perf_counter() - start_s,
                )
            except Exception as exc:  # any compiler failure means: stay eager
                logger.debug("zo2tier rng: torch.compile failed (%s); using the eager Philox path", exc)
        _compile_tried = True
    return _compiled


def _uniform_groups(g0: int, n_groups: int, k0: int, k1: int, ws: _Workspace) -> Tensor:
    """(4, n_groups) float32 uniforms of counters ``g0 .. g0 + n_groups - 1``."""
    fn = _compiled_kernel() if ws.ints.device.type == "cpu" else None
    if fn is None:
        return _uniform_eager(g0, n_groups, k0, k1, ws)
    padded = max(8, -(-n_groups // 8) * 8)  # keep dynamic shapes away from the 0/1 specializations
    with torch.no_grad():  # grad mode is part of the compile guards: keep it constant
        u = fn(ws.arange[:padded] + g0, torch.tensor(k0), torch.tensor(k1))
    return u[:, :n_groups]


def _box_muller_(u: Tensor, z: Tensor) -> Tensor:
    """(4, G) uniforms -> (4, G) normals; destroys ``u``. Op order is part of the spec."""
    r, theta = u[0::2], u[1::2]  # lanes (0, 2) give radii, lanes (1, 3) angles
    r.log_().mul_(-2.0).sqrt_()  # r = sqrt(-2 ln u0)
    theta.mul_(TWO_PI_F32)  # theta = u1 * float32(2 pi)
    torch.cos(theta, out=z[0::2]).mul_(r)
    torch.sin(theta, out=z[1::2]).mul_(r)
    return z


def _rademacher_(u: Tensor, z: Tensor) -> Tensor:
    """sign = 1 - 2 * bit31(w); bit 31 is set exactly when u >= 0.5."""
    torch.ge(u, 0.5, out=z)  # bool result cast to 0.0 / 1.0
    return z.mul_(-2.0).add_(1.0)


def _fill(out: Tensor, *, k0: int, k1: int, offset: int, kind: str, consume: Optional[Callable] = None) -> None:
    """Write values ``offset .. offset + out.numel() - 1`` of key ``(k0, k1)`` into flat float32 ``out``.

    kind: "gaussian", "rademacher" or "uniform". With ``consume``, ``out`` is unused and
    ``consume(lo, values)`` receives each chunk instead (``lo`` relative to ``offset``).
    """
    ws = _workspace(out.device)
    first, end = offset, offset + out.numel()
    g = first // 4
    while 4 * g < end:
        n = min(ws.n_groups, (end + 3) // 4 - g)
        u = _uniform_groups(g, n, k0, k1, ws)
        if kind == "gaussian":
            vals = _box_muller_(u, ws.z[:, :n])
        elif kind == "rademacher":
            vals = _rademacher_(u, ws.z[:, :n])
        else:
            vals = u
        lo, hi = max(4 * g, first), min(4 * (g + n), end)
        flat = ws.flat[: 4 * n]
        flat.view(n, 4).copy_(vals.t())  # lane-major (4, G) -> element order
        part = flat[lo - 4 * g : hi - 4 * g]
        if consume is not None:
            consume(lo - first, part)
        else:
            out[lo - first : hi - first].copy_(part)
        g += n


def normal(
    step_seed: int,
    param_id: int,
    numel: int,
    *,
    offset: int = 0,
    device: Union[str, torch.device] = "cpu",
    kind: str = "gaussian",
) -> Tensor:
    """z[offset : offset + numel] of parameter ``param_id`` at ``step_seed``, float32.

    kind="gaussian" gives N(0, 1) samples (Box-Muller); kind="rademacher" gives +-1 signs.

    >>> z = normal(7, 3, 6)
    >>> torch.equal(normal(7, 3, 4, offset=2), z[2:])
    True
    """
    _check_u32("step_seed", step_seed)
    _check_u32("param_id", param_id)
    _check_range(numel, offset)
    _check_kind(kind)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    _fill(out, k0=step_seed, k1=param_id, offset=offset, kind=kind)
    return out


def sr_uniform(
    sr_seed: int, param_id: int, numel: int, *, offset: int = 0, device: Union[str, torch.device] = "cpu"
) -> Tensor:
    """Stochastic-rounding uniforms in (0, 1), float32, keyed ``k0 = sr_seed``, ``k1 = param_id | 2**31``.

    >>> u = sr_uniform(1, 2, 5)
    >>> bool(((u > 0) & (u < 1)).all())
    True
    """
    _check_u32("sr_seed", sr_seed)
    _check_u32("param_id", param_id, limit=1 << 31)
    _check_range(numel, offset)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    _fill(out, k0=sr_seed, k1=param_id | _SR_DOMAIN, offset=offset, kind="uniform")
    return out

