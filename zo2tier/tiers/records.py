"""One record per block: where it lives, what it holds, and how many logged updates its stored copy has.

The :class:`BlockTable` is the single owner of these records; tier changes go through it and are checked.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from zo2tier.budget import TIERS
from zo2tier.model.blocks import ModelLayout, ParamSpec
from zo2tier.tiers.codec import encoded_bytes


@dataclass(frozen=True)
class ParamSlot:
    """A parameter inside a block's flat buffer: ``flat[offset : offset + spec.numel]``."""

    spec: ParamSpec
    offset: int
    local_names: tuple[str, ...]  # names inside the owning module (tied names included)


@dataclass
class BlockRecord:
    """A movable block (or the resident set) and its stored copy.

    ``applied_steps`` counts the entries of the engine's update log already folded into the stored
    copy: the entries after it are pending and are replayed on arrival.
    """

    index: int
    name: str
    tier: str
    storage: str
    slots: tuple[ParamSlot, ...]
    numel: int
    applied_steps: int = 0
    data: torch.Tensor | None = None  # uint8 stored bytes (device or host tier)
    path: str | None = None  # disk tier file
    write_future: Future | None = field(default=None, repr=False)  # the last write-back in flight

    @property
    def stored_bytes(self) -> int:
        return encoded_bytes(self.numel, self.storage)


def make_slots(params: list[ParamSpec], local_names: dict[int, tuple[str, ...]]) -> tuple[tuple[ParamSlot, ...], int]:
    """Lay ``params`` out back to back in one flat buffer; returns the slots and the total numel."""
    slots, offset = [], 0
    for spec in params:
        slots.append(ParamSlot(spec, offset, local_names[spec.param_id]))
        offset += spec.numel
    return tuple(slots), offset


class BlockTable:
    """Owns every :class:`BlockRecord`; checks tier assignments."""

    def __init__(self, records: list[BlockRecord]) -> None:
        self._records = records
        for r in records:
            if r.tier not in TIERS:
                raise ValueError(f"block {r.name} has unknown tier {r.tier!r}")

    def __iter__(self):
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> BlockRecord:
        return self._records[index]

    def by_tier(self, tier: str) -> list[BlockRecord]:
        return [r for r in self._records if r.tier == tier]

    def mark_applied(self, record: BlockRecord, n_steps: int) -> None:
        """Record that the stored copy now holds the first ``n_steps`` log entries."""
        if n_steps < record.applied_steps:
            raise RuntimeError(
                f"block {record.name}: stored copy holds {record.applied_steps} updates; cannot go back to {n_steps}"
            )
        record.applied_steps = n_steps


def block_records(layout: ModelLayout, placement: dict[str, str], storage: dict[str, str],
                  resident_name: str) -> list[BlockRecord]:
    """One record per block of ``layout`` in execution order, its parameters back to back, on the tier
    ``placement`` names in ``storage``'s dtype for it; last, the resident set (every parameter outside the
    blocks) on the device."""

    def record(index: int, name: str, tier: str, params: list[ParamSpec]) -> BlockRecord:
        slots, offset = [], 0
        for spec in params:
            slots.append(ParamSlot(spec, offset, ()))
            offset += spec.numel
        return BlockRecord(index, name, tier, storage[tier], tuple(slots), offset)

    records = [record(i, name, placement[name], layout.params_under(name)) for i, name in enumerate(layout.block_names)]
    in_blocks = {s.spec.param_id for r in records for s in r.slots}
    resident = [p for p in layout.params if p.param_id not in in_blocks]
    return records + [record(len(records), resident_name, "device", resident)]
