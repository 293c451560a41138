"""Storage dtypes: encode a clean fp32 block into its stored bytes and decode it back.

Pure tensor math: no I/O. Narrow dtypes are written with stochastic rounding (a keyed counter-based
uniform per element, see :func:`zo2tier.zo.rng.sr_uniform`), so that updates far below the storage
quantum survive on average instead of rounding to zero. int8 is symmetric with one fp32 absmax scale per
group of :data:`INT8_GROUP` consecutive elements of the flat block; the scales follow the int8 payload.
"""

from __future__ import annotations

import torch

from zo2tier.zo.rng import sr_uniform

INT8_GROUP = 64
STORAGE_DTYPES = ("fp32", "bf16", "fp16", "int8")
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16 -> "fp16"``; raises ValueError for dtypes zo2tier cannot store."""
    if dtype not in _NAMES:
        raise ValueError(f"parameters of dtype {dtype} cannot be stored; use fp32, bf16 or fp16 models")
    return _NAMES[dtype]


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


def decode(raw: torch.Tensor, dtype: str, numel: int, out: torch.Tensor) -> torch.Tensor:
    """Fill fp32 ``out[:numel]`` from the uint8 bytes ``raw`` holding a block stored as ``dtype``."""
    if dtype == "int8":
        q = raw[:numel].view(torch.int8)
        start = _scale_offset(numel)
        scales = raw[start : start + 4 * _n_groups(numel)].view(torch.float32)
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
    src: torch.Tensor, dtype: str, raw: torch.Tensor, *, sr_seed: int, sr_key: int, stochastic: bool = True
) -> torch.Tensor:
    """Write fp32 ``src`` (flat) into the uint8 buffer ``raw`` as ``dtype``.

    Narrow dtypes round stochastically with the uniforms keyed by ``(sr_seed, sr_key)``; pass
    ``stochastic=False`` for round-to-nearest (used to show that it stalls training).
    """
    numel = src.numel()
    if dtype == "fp32":
        raw[: 4 * numel].view(torch.float32).copy_(src)
        return raw
    noise = sr_uniform(sr_seed, sr_key, numel, device=src.device) if stochastic else None
    if dtype == "int8":
        _encode_int8(src, raw, noise)
        return raw
    target = raw[: encoded_bytes(numel, dtype)].view(_TORCH[dtype])
    if noise is None:
        target.copy_(src)
    else:
        target.copy_(_round_float_stochastic(src, _TORCH[dtype], noise))
    return raw


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


def _encode_int8(src: torch.Tensor, raw: torch.Tensor, u: torch.Tensor | None) -> None:
    numel = src.numel()
    n_groups = _n_groups(numel)
    padded = torch.zeros(n_groups * INT8_GROUP, dtype=torch.float32, device=src.device)
    padded[:numel] = src
    groups = padded.view(n_groups, INT8_GROUP)
    scales = groups.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = groups / scales[:, None]
    if u is None:
        q = scaled.round()
    else:
        noise = torch.zeros_like(padded)
        noise[:numel] = u
        q = torch.floor(scaled + noise.view(n_groups, INT8_GROUP))
    q = q.clamp_(-127, 127).to(torch.int8).view(-1)[:numel]
    raw[:numel].view(torch.int8).copy_(q)
    start = _scale_offset(numel)
    raw[start : start + 4 * n_groups].view(torch.float32).copy_(scales)
