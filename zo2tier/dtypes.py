"""The one table of dtype names: ``"fp32"``, ``"bf16"``, ``"fp16"`` (compute or storage) and ``"int8"`` (storage)."""

from __future__ import annotations

import torch

FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_DTYPES: dict[str, torch.dtype] = {**FLOAT_DTYPES, "int8": torch.int8}
STORAGE_DTYPES = tuple(TORCH_DTYPES)  # ("fp32", "bf16", "fp16", "int8")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"fp16"``; raises ValueError for a dtype models cannot be computed in."""
    for name, value in FLOAT_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"parameters of dtype {dtype} cannot be stored; use fp32, bf16 or fp16 models")
