"""Stacked copies: how a step's copies of the batch are cut into spans that each run a block part once, and
the buffer their stacked weights are built into (docs/estimators.md, "Stacked copies").

A span holds as many copies as :data:`zo2tier.plan.STACK_BYTES` has room for on the device type (none on a
type it does not list), never splits a ± pair (built together by one pass), and is only cut for steps of more
than two copies: MeZO's pair and an evaluation run one copy at a time, as before stacking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zo2tier.plan import stack_copies


def pair_up(groups: Sequence[tuple[int, float]]) -> list[int]:
    """For each copy, the first copy of its pass: a copy ``(seed, -s)`` right after ``(seed, s)`` (s ≠ 0)
    shares that copy's pass, which builds θ+sz and θ−sz together."""
    first = []
    for i, (seed, scale) in enumerate(groups):
        prev = groups[i - 1] if i else None
        paired = (prev is not None and first[i - 1] == i - 1 and scale != 0.0 and prev == (seed, -scale)
                  and prev[1] > 0)
        first.append(i - 1 if paired else i)
    return first


class CopyStack:
    """Room for stacked copies of the largest block part (``part_numel`` weights in ``dtype`` on ``device``),
    allocated at first use; nothing is allocated where fewer than two copies fit."""

    def __init__(self, part_numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.part_numel, self.dtype, self.device = max(part_numel, 1), dtype, device
        self._buf: torch.Tensor | None = None

    @property
    def copies_per_call(self) -> int:
        """Copies of a part stacked in one call: as many as ``zo2tier.plan.STACK_BYTES`` holds here (1: none)."""
        return stack_copies(self.part_numel * self.dtype.itemsize, self.device.type)

    @property
    def allocated(self) -> bool:
        return self._buf is not None

    def spans(self, groups: Sequence[tuple[int, float]]) -> list[tuple[int, int]]:
        """The copies ``groups`` of a step cut into spans ``[a, b)`` of at most :attr:`copies_per_call`, never
        between a ± pair; none (one copy at a time) for two copies or fewer, or room for fewer than two."""
        limit = self.copies_per_call
        if len(groups) <= 2 or limit < 2:
            return []
        first_of = pair_up(groups)
        units = [(i, i + 2 if i + 1 < len(first_of) and first_of[i + 1] == i else i + 1)
                 for i in range(len(first_of)) if first_of[i] == i]
        spans: list[tuple[int, int]] = []
        for lo, hi in units:
            if spans and hi - spans[-1][0] <= limit:
                spans[-1] = (spans[-1][0], hi)
            else:
                spans.append((lo, hi))
        return spans

    def rows(self, n_copies: int, step_copies: int) -> torch.Tensor:
        """``(n_copies, part_numel)`` rows to build copies into: made for as many as a span of a step of
        ``step_copies`` copies holds, grown if a later step's spans hold more."""
        if self._buf is None or self._buf.shape[0] < n_copies:
            rows = min(self.copies_per_call, max(n_copies, step_copies))
            self._buf = None  # the old rows go before the new ones are made
            self._buf = torch.empty((rows, self.part_numel), dtype=self.dtype, device=self.device)
        return self._buf[:n_copies]
