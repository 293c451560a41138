"""Host <-> GPU transfers for host-tier blocks: a copy stream, a write-back stream, events, fixed slots.

Uploads of the next blocks run on their own stream while the compute stream works on the current one;
write-backs (GPU -> pinned host) run on a third stream, so reads and writes overlap. Device slots are
allocated once in :meth:`CudaTransfers.open`; nothing is allocated per step. A block written back is updated
in place in its slot and copied down from there: the slot is refilled only once that copy has landed.
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch

from zo2tier.tiers.records import BlockRecord


class CudaTransfers:
    """Schedule-driven uploads of host-tier blocks and asynchronous write-backs, on CUDA only."""

    def __init__(self, device: torch.device, slot_bytes: int, n_slots: int) -> None:
        self.device = device
        self.slot_bytes = slot_bytes
        self.n_slots = max(1, n_slots)
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.timeline = None  # a zo2tier.trace.Timeline while ZOEngine.trace() records

    def open(self) -> CudaTransfers:
        self._copy = torch.cuda.Stream(self.device)
        self._back = torch.cuda.Stream(self.device)
        self._free: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque(
            (torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device), None) for _ in range(self.n_slots)
        )
        self._ready: deque[tuple[int, torch.Tensor, torch.cuda.Event]] = deque()
        self._write_events: dict[int, torch.cuda.Event] = {}
        return self

    def queued(self) -> int:
        return len(self._ready)

    def is_queued(self, index: int) -> bool:
        return any(i == index for i, _, _ in self._ready)

    def has_free_slot(self) -> bool:
        return bool(self._free)

    def upload(self, record: BlockRecord) -> None:
        """Start copying ``record``'s host bytes into a free slot on the copy stream."""
        slot, freed = self._free.popleft()
        with torch.cuda.stream(self._copy):
            if freed is not None:
                self._copy.wait_event(freed)  # the compute stream is done with this slot
            pending = self._write_events.get(record.index)
            if pending is not None:
                self._copy.wait_event(pending)  # its last write-back has landed in host memory
            with self._span("H2D copy", record.name, self._copy):
                slot[: record.stored_bytes].copy_(record.data, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy)
        self._ready.append((record.index, slot, done))
        self.h2d_bytes += record.stored_bytes

    def take(self, record: BlockRecord) -> torch.Tensor:
        """The uploaded bytes of ``record`` (uploading now if it was not prefetched)."""
        while self._ready and self._ready[0][0] != record.index:
            _, slot, done = self._ready.popleft()  # the schedule changed: drop the stale upload
            self._free.append((slot, done))
        if not self._ready:
            self.upload(record)
        _, slot, done = self._ready.popleft()
        torch.cuda.current_stream(self.device).wait_event(done)
        self._taken = slot
        return slot[: record.stored_bytes]

    def give_back(self, slot_view: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """The compute stream has enqueued its last use of the slot; it can be refilled after that, and after
        ``after`` too (the event :meth:`write_back` returned when it copies down from the slot)."""
        freed = after
        if freed is None:
            freed = torch.cuda.Event()
            freed.record(torch.cuda.current_stream(self.device))
        self._free.append((self._taken, freed))

    def write_back(self, record: BlockRecord, raw: torch.Tensor, lo: int = 0, hi: int | None = None
                   ) -> torch.cuda.Event:
        """Copy encoded bytes ``raw[lo:hi]`` (on the GPU) into the block's pinned host copy, asynchronously.

        Returns the event of the copy having landed (copies land in order, so it covers the earlier ones).
        ``raw`` (the block's slot, or an encode buffer) is read on the write-back stream until then: the
        caller must not change it before that event. A block can go down range by range (each part of a
        layer as soon as its kernel pass has written it).
        """
        hi = raw.numel() if hi is None else hi
        encoded = torch.cuda.Event()
        encoded.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._back):
            self._back.wait_event(encoded)  # the compute stream has finished writing raw
            with self._span("D2H copy", record.name, self._back):
                record.data[lo:hi].copy_(raw[lo:hi], non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(self._back)
        self._write_events[record.index] = landed
        self.d2h_bytes += hi - lo
        return landed

    def _span(self, lane: str, name: str, stream: torch.cuda.Stream):
        tl = self.timeline
        return tl.stream_span(lane, name, stream) if tl is not None else contextlib.nullcontext()

    def synchronize(self) -> None:
        self._copy.synchronize()
        self._back.synchronize()
        for _, slot, done in list(self._ready):
            self._free.append((slot, done))
        self._ready.clear()
