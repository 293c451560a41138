"""How a step's per-copy losses are computed and reduced: in one process, or across data-parallel ranks.

The engine's step is written once: it runs the copies a :class:`Collective` assigns to this process on the
batch shard it gives, asks it for every copy's loss, and hands those to the estimator. One process runs
every copy on the whole batch and takes the causal-LM mean (or the caller's ``loss_fn``) per copy. Data
parallel (``zo2tier/distributed.py``) shards the batch, gathers per-sample rows from every rank and reduces
them to the same per-copy losses on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from zo2tier.zo.estimators import Group
from zo2tier.zo.update import causal_lm_loss

LossFn = Callable[[torch.Tensor, Mapping[str, Any]], float]


class Collective(Protocol):
    """The seam the step uses; :class:`Local` and ``distributed.Replicas`` implement it."""

    def perturbations(self, q: int, auto: bool = False) -> int: ...

    def before_step(self, engine: Any) -> None: ...

    def shard(self, batch: Mapping[str, Any]) -> Mapping[str, Any]: ...

    def widest_shard(self, local_rows: int) -> int: ...

    def copies_to_run(self, groups: Sequence[Group]) -> tuple[int, ...]: ...

    def losses(self, logits: Sequence[torch.Tensor], labels: torch.Tensor, ran: Sequence[int], n_groups: int, *,
               loss_fn: LossFn | None, batch: Mapping[str, Any], header: tuple[float, int, int],
               device: torch.device) -> list[float]: ...


class Local:
    """One process: every copy on the whole batch; a copy's loss is the causal-LM mean over its tokens."""

    def perturbations(self, q: int, auto: bool = False) -> int:
        """The estimator's q: as configured (``auto``: as the planner chose)."""
        return q

    def before_step(self, engine: Any) -> None:
        return None

    def shard(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        return batch

    def widest_shard(self, local_rows: int) -> int:
        """Rows of the widest rank's shard of the last batch (``auto`` plans for it, so every rank picks alike)."""
        return local_rows

    def copies_to_run(self, groups: Sequence[Group]) -> tuple[int, ...]:
        return tuple(range(len(groups)))

    def losses(self, logits: Sequence[torch.Tensor], labels: torch.Tensor, ran: Sequence[int], n_groups: int, *,
               loss_fn: LossFn | None, batch: Mapping[str, Any], header: tuple[float, int, int],
               device: torch.device) -> list[float]:
        if loss_fn is None:
            return [causal_lm_loss(x, labels) for x in logits]
        return [float(loss_fn(x, batch)) for x in logits]
