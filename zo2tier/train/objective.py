"""Losses and accuracy over label words: pure tensor math on (B, T, V) logits and a collated batch.

Every function takes a batch from :func:`zo2tier.train.data.collate` (keys ``labels``, ``pred_pos``,
``targets``, ``word_ids``), so each can be handed to ``ZOEngine.step(batch, loss_fn=...)`` as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from zo2tier.zo.update import causal_lm_loss

OBJECTIVES = ("lm", "classification")


def label_word_logits(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """(B, C) logits of each label word's first token at the position that predicts the answer."""
    pred_pos = batch["pred_pos"].to(logits.device)  # (B,)
    word_ids = batch["word_ids"].to(logits.device)  # (C,)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, pred_pos][:, word_ids].float()  # (B, C)


def classification_loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> float:
    """Cross-entropy of the gold class over a softmax restricted to the label words' logits."""
    return float(F.cross_entropy(label_word_logits(logits, batch), batch["targets"].to(logits.device)))


def label_word_lm_loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> float:
    """The causal-LM loss on the gold label word's tokens only (``labels`` is -100 elsewhere)."""
    return causal_lm_loss(logits, batch["labels"].to(logits.device))


def predictions(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """(B,) predicted class: the label word with the highest next-token log-probability.

    Log-softmax over the whole vocabulary shifts every word by the same constant, so the arg-max of the
    raw logits is the arg-max of the log-probabilities.
    """
    return label_word_logits(logits, batch).argmax(dim=-1).cpu()


def n_correct(logits: torch.Tensor, batch: Mapping[str, Any]) -> int:
    return int((predictions(logits, batch) == batch["targets"].cpu()).sum())


def loss_fn_for(objective: str) -> Callable[[torch.Tensor, Mapping[str, Any]], float]:
    """The per-half loss for ``ZOEngine.step``: ``"lm"`` (label-word LM loss) or ``"classification"``."""
    if objective == "lm":
        return label_word_lm_loss
    if objective == "classification":
        return classification_loss
    raise ValueError(f"objective={objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
