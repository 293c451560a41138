"""A block's visit on the fused GPU path: fetch, replay the pending updates, write back, build θ±εz.

The visit opens at the block's first part in a forward and closes after its last. One Triton pass per
parameter of a part replays the block's pending log entries on the stored bytes, writes θ back when the
visit's :class:`WritePlan` says so, and builds the part's θ+εz and θ−εz. What the visit writes, and when
its bytes go down to the host, is fixed when it opens:

- ``NONE``: nothing is written; the stored bytes stay as fetched.
- ``IN_PLACE`` (float storage): each part's pass writes θ into the stored bytes (stochastic rounding). A host
  block goes down part by part as each pass writes it; parts never run are written at close.
- ``INT8_WHOLE``: the block is replayed and re-encoded range by range into the encode buffer when it opens;
  a host block goes down at once, while the parts compute.
- ``INT8_BY_PART`` (in a forward, more than one update pending, parts on int8 groups): each part's pass
  replays its span once, builds θ±εz and re-encodes the span; a host block goes down part by part, the
  scales last.

A step with several perturbations builds the part's clean θ once (the first pass, at ε = 0, into a θ
buffer in the compute dtype) and every copy's θ±εz from it (:meth:`FusedVisits.perturb`), whatever the
tier: so the copies are the same floats on every tier.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from zo2tier.dtypes import TORCH_DTYPES
from zo2tier.tiers.codec import encode_int8_range, int8_scales
from zo2tier.tiers.manager import TierManager
from zo2tier.tiers.records import BlockRecord
from zo2tier.visit.bindings import Binding, ModelBindings, one_slot, whole
from zo2tier.zo import fused


class WritePlan(enum.Enum):
    NONE = "none"
    IN_PLACE = "in place"
    INT8_WHOLE = "int8, whole block at open"
    INT8_BY_PART = "int8, part by part"


@dataclass
class Visit:
    """A block between its first and its last part in this forward."""

    record: BlockRecord
    plan: WritePlan
    raw: torch.Tensor  # the stored bytes on the device
    staging: torch.Tensor | None
    stored: torch.Tensor  # raw viewed as the stored dtype, the block's numel elements
    scales: torch.Tensor | None  # int8: the stored scales (views of raw)
    log: fused.PendingLog
    sr_seed: int
    encoded: torch.Tensor | None = None  # INT8_*: the re-encoded bytes
    done: set = field(default_factory=set)  # binding indices run
    sent: set = field(default_factory=set)  # bindings whose bytes went down to the host copy already
    landed: Any = None  # the event of the last range sent down
    written: bool = False  # INT8_WHOLE on the host: handed to its tier at open

    @property
    def writes(self) -> bool:
        return self.plan is not WritePlan.NONE


class FusedVisits:
    """Opens, runs and closes block visits on the fused path. ``write_due(record, pending)`` is the engine's
    write-back schedule; ``encode_buffer(n_bytes)`` the shared int8 encode buffer (its users wait for the
    last D2H reading it); ``on_encoded_sent(event)`` tells its owner when that D2H is done."""

    def __init__(self, tiers: TierManager, bindings: ModelBindings, *, perturbation: str,
                 write_due: Callable[[BlockRecord, int], bool],
                 encode_buffer: Callable[[int], torch.Tensor],
                 on_encoded_sent: Callable[[Any], None],
                 range_buffer: Callable[[], torch.Tensor]) -> None:
        self.tiers, self.bindings, self.perturbation = tiers, bindings, perturbation
        self.write_due, self.encode_buffer = write_due, encode_buffer
        self.on_encoded_sent, self.range_buffer = on_encoded_sent, range_buffer

    def open(self, record: BlockRecord, *, pending_log: Callable[[int], fused.PendingLog], n_log: int,
             sr_seed: int, force_write: bool = False, in_forward: bool = False) -> Visit:
        """Fetch ``record`` and fix its write plan (due, or ``force_write``). The pending entries are counted
        after the fetch, which settles a write-back of the block still in flight."""
        raw, staging = self.tiers.fetch(record)
        pending = n_log - record.applied_steps
        log = pending_log(record.applied_steps)
        raw = raw.to(self.tiers.device)
        dtype = TORCH_DTYPES[record.storage]
        stored = raw[: record.numel].view(dtype) if dtype == torch.int8 else raw.view(dtype)[: record.numel]
        write = pending > 0 and (force_write or self.write_due(record, pending))
        if not write:
            plan = WritePlan.NONE
        elif dtype != torch.int8:
            plan = WritePlan.IN_PLACE
        elif in_forward and pending > 1 and record.index in self.bindings.on_groups:
            # one pending update: a second replay costs less than the D2H the next block might wait for
            plan = WritePlan.INT8_BY_PART
        else:
            plan = WritePlan.INT8_WHOLE
        visit = Visit(record, plan, raw, staging, stored,
                      int8_scales(raw, record.numel) if dtype == torch.int8 else None, log, sr_seed)
        if plan in (WritePlan.INT8_WHOLE, WritePlan.INT8_BY_PART):  # the codec writes int8 (groups span params)
            visit.encoded = self.encode_buffer(record.stored_bytes)
        if plan is WritePlan.INT8_WHOLE:
            self.int8_pass(visit)
            if record.tier == "host":  # down now, while the parts compute (the next encode waits for it)
                self.on_encoded_sent(self.tiers.write_back(record, visit.encoded, n_steps=n_log))
                visit.written = True
        return visit

    def part_pass(self, visit: Visit, binding: Binding, plus: torch.Tensor, minus: torch.Tensor | None,
                  eps: float, seed: int) -> None:
        """The part's first pass in this visit: replay the pending updates, write per the plan, and fill
        ``plus``/``minus`` (the part's views, from 0) with θ±εz."""
        if visit.plan is WritePlan.INT8_BY_PART:
            self.int8_pass(visit, span=(binding.lo, binding.lo + binding.numel), plus=plus, minus=minus, eps=eps,
                           seed=seed)
            return
        in_place = visit.plan is WritePlan.IN_PLACE
        for slot, _ in binding.params:
            o, n = slot.offset, slot.spec.numel
            r = o - binding.lo
            fused.arrive(visit.stored[o : o + n], param_id=slot.spec.param_id, decay=slot.spec.decay,
                         log=visit.log, new_seed=seed, eps=eps, plus=plus[r : r + n],
                         minus=None if minus is None else minus[r : r + n],
                         write_to=visit.stored[o : o + n] if in_place else None, sr_seed=visit.sr_seed,
                         sr_key=visit.record.index, sr_offset=o, kind=self.perturbation, scales=visit.scales)

    def perturb(self, theta: torch.Tensor, binding: Binding, plus: torch.Tensor, minus: torch.Tensor | None,
                eps: float, seed: int, no_log: fused.PendingLog) -> None:
        """θ±εz of a part from ``theta`` (its clean weights in the compute dtype, from 0): one more
        perturbation of a step, nothing replayed or written."""
        for slot, _ in binding.params:
            r, n = slot.offset - binding.lo, slot.spec.numel
            fused.arrive(theta[r : r + n], param_id=slot.spec.param_id, decay=False, log=no_log, new_seed=seed,
                         eps=eps, plus=plus[r : r + n], minus=None if minus is None else minus[r : r + n],
                         write_to=None, sr_seed=0, sr_key=0, sr_offset=0, kind=self.perturbation)

    def int8_pass(self, visit: Visit, span: tuple[int, int] | None = None, plus: torch.Tensor | None = None,
                  minus: torch.Tensor | None = None, eps: float = 0.0, seed: int = 0) -> None:
        """Replay an int8 block that is written back and re-encode it into ``visit.encoded``, one range of
        :data:`~zo2tier.tiers.codec.WRITE_BACK_RANGE_NUMEL` elements at a time: the fused kernel replays each range into an fp32
        buffer, then the encoder keeps every group's stored scale that still fits. fp32 room for one range,
        not the block: 16 MiB instead of 2.5 GB at OPT-30B. ``span``: only elements ``[lo, hi)`` of the block
        (a part on group boundaries); with ``plus`` (the part's views, from ``lo``) the same pass builds its
        θ±εz."""
        record, stored, scales = visit.record, visit.stored, visit.scales
        buf = self.range_buffer()  # a piece may start up to 3 elements before its range (Philox groups of 4)
        start, end, step = *(span or (0, record.numel)), buf.numel() - 4
        for lo in range(start, end, step):
            hi = min(lo + step, end)
            for slot in record.slots:
                o, n = slot.offset, slot.spec.numel
                a, b = max(lo, o) - o, min(hi, o + n) - o
                if a >= b:
                    continue
                a -= a % 4  # the elements before lo are recomputed to the same values
                first, last = o + a, o + b
                piece = buf[first - lo + 4 : last - lo + 4]
                # θ goes to the range buffer (write_to); without the part's views, plus (θ itself at eps = 0,
                # no z drawn) is pointed at it too, as the kernel needs somewhere to write
                fused.arrive(stored[first:last], param_id=slot.spec.param_id, decay=slot.spec.decay, log=visit.log,
                             new_seed=seed, eps=eps, write_to=piece, sr_seed=visit.sr_seed, sr_key=record.index,
                             plus=piece if plus is None else plus[first - start : last - start],
                             minus=None if minus is None else minus[first - start : last - start],
                             sr_offset=first, kind=self.perturbation, scales=scales, z_offset=a)
            encode_int8_range(buf[4 : 4 + hi - lo], visit.encoded, record.numel, lo, sr_seed=visit.sr_seed,
                              sr_key=record.index, prev_scales=scales, fused_kernel=True)

    def send_part(self, visit: Visit, binding_index: int) -> None:
        """A host block written part by part goes down part by part, each as soon as its pass wrote it."""
        record = visit.record
        if not (visit.plan in (WritePlan.IN_PLACE, WritePlan.INT8_BY_PART) and record.tier == "host"
                and self.tiers.sends_ranges):
            return
        binding, size = self.bindings[binding_index], TORCH_DTYPES[record.storage].itemsize
        source = visit.raw if visit.encoded is None else visit.encoded
        visit.landed = self.tiers.send_range(record, source, binding.lo * size, (binding.lo + binding.numel) * size)
        visit.sent.add(binding_index)

    def close(self, visit: Visit, scratch: torch.Tensor, n_log: int, last_block: int) -> None:
        """Finish a visit: owed writes of parts never run, the write-back, the slot, the next prefetch."""
        record = visit.record
        if visit.plan in (WritePlan.IN_PLACE, WritePlan.INT8_BY_PART):
            for b in sorted(self.bindings.parts_of.get(record.index, frozenset()) - visit.done):
                binding = self.bindings[b]
                self.part_pass(visit, binding, scratch[: binding.numel], None, 0.0, 0)
                if visit.sent:
                    self.send_part(visit, b)
        if visit.plan is WritePlan.INT8_BY_PART and visit.sent:  # the int8 scales (and padding) go down last
            visit.landed = self.tiers.send_range(record, visit.encoded, record.numel, record.stored_bytes)
        fresh = visit.raw if visit.encoded is None else visit.encoded
        landed = None
        if visit.sent:  # sent down part by part: the host copy is whole once the last range lands
            self.tiers.sent(record, n_log)
            landed = visit.landed
            if visit.encoded is not None:  # the next encode waits for the D2H reading the buffer
                self.on_encoded_sent(landed)
        elif visit.writes and record.tier == "host" and not visit.written:  # before the release: the D2H
            landed = self.tiers.write_back(record, fresh, n_steps=n_log)  # reads fresh until `landed`
            if visit.encoded is not None:
                self.on_encoded_sent(landed)
        self.tiers.release(visit.staging, after=landed if visit.encoded is None else None)
        if record.index < last_block:
            self.tiers.prefetch_after(record.index)
        if visit.writes and record.tier != "host":  # after the prefetch: a disk write may wait for staging
            self.tiers.write_back(record, fresh, n_steps=n_log)

    def whole_visit(self, visit: Visit, plus: torch.Tensor | None, minus: torch.Tensor | None, eps: float,
                    seed: int, scratch: torch.Tensor, n_log: int, last_block: int) -> None:
        """A whole visit of an opened block outside the forward: fill ``plus``/``minus`` (the whole block's
        θ±εz; ``plus=None``: not needed), write per the plan, close."""
        record = visit.record
        if plus is not None:
            self.part_pass(visit, whole(record), plus, minus, eps, seed)
        elif visit.plan is WritePlan.IN_PLACE:  # the in-place write needs a pass; its θ goes to scratch
            for slot in record.slots:
                self.part_pass(visit, one_slot(record, slot), scratch[: slot.spec.numel], None, 0.0, 0)
        visit.done = set(self.bindings.parts_of.get(record.index, frozenset()))
        self.close(visit, scratch, n_log, last_block)
