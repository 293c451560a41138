"""The update log and the loss: pure tensor math, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LogEntry:
    """One MeZO step as the log keeps it: enough to regenerate z and replay the update anywhere.

    The update is ``θ ← θ − lr·(projected_grad·z + weight_decay·θ)`` with z keyed by
    ``(step_seed, parameter id)``.
    """

    step: int
    step_seed: int
    projected_grad: float
    lr: float
    weight_decay: float

    def to_json(self) -> list:
        return [self.step, self.step_seed, self.projected_grad, self.lr, self.weight_decay]

    @classmethod
    def from_json(cls, row: list) -> "LogEntry":
        step, seed, g, lr, wd = row
        return cls(int(step), int(seed), float(g), float(lr), float(wd))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy over positions whose label is not -100, in fp32.

    logits: (B, T, V); labels: (B, T). Returns a Python float (NaN if no position is labelled).
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
    )
    return float(loss)
