"""The update log and the loss: pure tensor math, no I/O."""

from __future__ import annotations

import math
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

    @property
    def replayable(self) -> bool:
        """False for a slot a resumed checkpoint folded into the stored weights (NaN g, lr and wd)."""
        return math.isfinite(self.projected_grad) and math.isfinite(self.lr) and math.isfinite(self.weight_decay)

    @classmethod
    def from_json(cls, row: list) -> LogEntry:
        step, seed, g, lr, wd = row
        return cls(int(step), int(seed), float(g), float(lr), float(wd))


def inverse_entries(tail: list[LogEntry], start: int) -> list[LogEntry]:
    """Entries that undo ``tail`` when appended to a log of length ``start``: each entry's inverse, newest first.

    ``θ' = θ − lr·(g·z + wd·θ)`` is undone by ``θ = θ' + lr/(1 − lr·wd)·(g·z + wd·θ')``, i.e. the same seed
    and g with ``lr' = −lr/(1 − lr·wd)`` and the same wd. With wd = 0 (the default) that is ``−lr`` for every
    weight. With wd ≠ 0 it is exact for the decayed weights; the others (biases, norms: no decay) move back
    by ``lr·g·z/(1 − lr·wd)`` instead of ``lr·g·z``, a relative error of ``lr·wd`` (1e-7 at lr 1e-6, wd 0.1).
    In fp32 the result is θ up to rounding (``(θ − u) + u`` can differ from θ by an ulp), not bit for bit.
    Raises ``ValueError`` for an entry whose g or lr is not finite: a slot a checkpoint resume folded into
    the stored weights (``zo2tier.checkpoint.folded``), which cannot be undone.
    """
    if not all(e.replayable for e in tail):
        raise ValueError("the entries to undo include steps a resumed checkpoint folded into the stored weights; "
                         "they can only be undone in the run that made them")
    return [LogEntry(start + i, e.step_seed, e.projected_grad, -e.lr / (1.0 - e.lr * e.weight_decay),
                     e.weight_decay) for i, e in enumerate(reversed(tail))]


# Rows of logits cast to fp32 at a time by the loss: the fp32 copy and its log-softmax cost
# 2 * LOSS_CHUNK_ROWS * V * 4 bytes (0.1 GiB at V = 50272) instead of two fp32 copies of all B*(T-1) rows.
LOSS_CHUNK_ROWS = 256


def next_token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's fp32 log-probability of the next token, computed ``LOSS_CHUNK_ROWS`` rows at a time.

    logits: (B, T, V) of any float dtype; labels: (B, T), -100 where unlabelled. Returns
    ``(log_probs, targets)`` of shapes (B*(T-1), 1) and (B*(T-1),): ``log_probs[i]`` is
    ``log_softmax(logits.float())`` at the next token (at token 0 where the label is -100), and
    ``targets`` is 0, or -100 where unlabelled. ``F.nll_loss(log_probs, targets, ignore_index=-100)``
    (any reduction) then gives the same floats as ``F.cross_entropy`` on
    ``logits[:, :-1].float().reshape(-1, V)`` and ``labels[:, 1:].reshape(-1)`` (log-softmax is row by
    row, and nll_loss's reduction order depends only on the row count), without ever holding an fp32
    copy of all the logits.
    """
    b, t, _ = logits.shape
    shift_labels = labels[:, 1:]  # (B, T-1)
    index = torch.where(shift_labels == -100, 0, shift_labels)  # any other negative label still raises
    log_probs = torch.empty(b, t - 1, dtype=torch.float32, device=logits.device)
    for row in range(b):
        for lo in range(0, t - 1, LOSS_CHUNK_ROWS):
            hi = min(t - 1, lo + LOSS_CHUNK_ROWS)
            chunk = torch.log_softmax(logits[row, lo:hi].float(), dim=-1)  # (hi-lo, V) fp32
            log_probs[row, lo:hi] = chunk.gather(1, index[row, lo:hi, None])[:, 0]
    targets = torch.where(shift_labels == -100, -100, 0)
    return log_probs.reshape(-1, 1), targets.reshape(-1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy over positions whose label is not -100, in fp32.

    logits: (B, T, V); labels: (B, T). Returns a Python float (NaN if no position is labelled): the same
    float as ``F.cross_entropy`` on ``logits[:, :-1].float()``, computed ``LOSS_CHUNK_ROWS`` rows at a time.
    """
    log_probs, targets = next_token_log_probs(logits, labels)  # (N, 1), (N,)
    return float(F.nll_loss(log_probs, targets, ignore_index=-100))
