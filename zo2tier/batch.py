"""A training batch checked at the edge: ``(input_ids, attention_mask, labels)`` on the compute device."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def unpack(batch: Mapping[str, torch.Tensor], device: torch.device):
    """``(input_ids, attention_mask, labels)`` of a batch on ``device``; raises ValueError on a malformed one.

    Labels default to the input ids, -100 where the mask is 0.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("batch must be a dict with 'input_ids' (and optionally 'attention_mask', 'labels')")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got {getattr(ids, 'shape', ids)!r}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input_ids has dtype {ids.dtype}; pass token ids as an integer tensor (torch.long)")
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    for key, t in (("attention_mask", mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != tuple(ids.shape):
            raise ValueError(f"{key} has shape {tuple(t.shape)} but input_ids has {tuple(ids.shape)}; they must match")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return ids.to(device), None if mask is None else mask.to(device), labels.to(device)


def check_lr(lr: float | None) -> None:
    """A step's ``lr`` override: None (the config's) or a finite number >= 0."""
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0
                           or not math.isfinite(lr)):
        raise ValueError(f"lr={lr!r} must be a finite number >= 0; pass e.g. lr=1e-6, or None for config.lr")
