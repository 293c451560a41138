"""What the proxies call: each bound module runs every copy of the batch with that copy's weights.

A forward runs the batch repeated ``len(groups)`` times; copy i sees ``θ + scale_i·z(seed_i)`` (scale 0:
θ itself). The runner gets each block's clean weights, either through a fused visit (:mod:`fused_visit`)
or, off the fused path, as an fp32 working copy: the stored bytes decoded, the pending log entries
replayed, written back when due. θ itself is never perturbed in place, so nothing drifts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zo2tier.dtypes import TORCH_DTYPES
from zo2tier.model.proxy import Runner, run_groups
from zo2tier.tiers.codec import WRITE_BACK_RANGE_NUMEL, decode, encode, int8_scales
from zo2tier.tiers.manager import TierManager
from zo2tier.tiers.records import BlockRecord, BlockTable
from zo2tier.visit.bindings import Binding, ModelBindings
from zo2tier.visit.fused_visit import FusedVisits, Visit
from zo2tier.visit.stacking import CopyStack, pair_up
from zo2tier.zo import fused
from zo2tier.zo.kernels import apply_update_, perturb_into
from zo2tier.zo.rng import step_seed
from zo2tier.zo.update import LogEntry

SR_SALT = 0x5A5A5A5A  # stochastic rounding of write-backs: step_seed(seed ^ SR_SALT, len(log))


@dataclass(frozen=True)
class Schedule:
    """When a host or disk block is written back: every ``write_back_every[tier]`` steps (block i at steps t
    with ``(t + i) % K == 0``, so a step's write-backs are spread), or once ``max_log`` entries are pending.
    ``per_step``: log entries a step appends (the estimator's q). ``keep_disk``: never write disk blocks
    during training (a shared disk tier consolidates them, ``zo2tier/shared_disk.py``)."""

    write_back_every: dict[str, int]
    max_log: int | None = None
    per_step: int = 1
    keep_disk: bool = False

    def log_limit(self, tier: str) -> int:
        """Pending entries at which a block of ``tier`` is written back."""
        k = self.write_back_every[tier] * self.per_step
        return k if self.max_log is None else min(k, self.max_log)

    def due(self, record: BlockRecord, pending: int, n_log: int) -> bool:
        if pending <= 0 or record.tier == "device":
            return pending > 0
        if record.tier == "disk" and self.keep_disk:
            return False
        k = self.write_back_every[record.tier]
        return pending >= self.log_limit(record.tier) or (n_log // self.per_step + record.index) % k == 0


@dataclass(frozen=True)
class Copies:
    """The copies of the batch in one forward: ``(seed, scale)`` each, and the rows they span."""

    groups: tuple[tuple[int, float], ...]
    rows: int  # dim 0 of the repeated batch
    other_rows: tuple[int, ...] = ()  # batch-major multiples of it: its tokens flattened, its heads flattened
    batchless_rows: int = 0  # a dim 0 a keyword tensor may have without a batch: the head count (MPT's ALiBi)


@dataclass
class Arrived:
    """A block off the fused path between its first and last part: its fp32 working copy, already
    written back and released on arrival."""

    record: BlockRecord
    work: torch.Tensor
    done: set


class BlockRunner:
    """Runs the proxied modules over the tiers. The engine owns it; ``log`` is the engine's update log."""

    def __init__(self, table: BlockTable, tiers: TierManager, log: list[LogEntry], *, seed: int, perturbation: str,
                 schedule: Schedule, compute_dtype: torch.dtype, bind: Callable[[Runner], ModelBindings]) -> None:
        """``bind(runner)`` installs the proxies that call ``runner`` and returns their bindings."""
        self.table, self.tiers, self.log = table, tiers, log
        self.bindings = bindings = bind(self.run)
        self.seed, self.perturbation, self.schedule = seed, perturbation, schedule
        self.device, self.compute_dtype = tiers.device, compute_dtype
        self.timeline = None  # set while a trace records
        self.resident = len(table) - 1
        records = list(table)
        self._largest = max(r.numel for r in records)
        part = bindings.largest_part(self.resident) if len(records) > 1 else 0
        fused_blocks = any(self.is_fused(r) for r in records[:-1])
        # θ±εz scratch: a block part's θ+εz and θ−εz side by side (the fused path builds both in one pass), or
        # one resident module's view; the generic path builds one copy at a time
        self._scratch = torch.empty(max(2 * part if fused_blocks else part, bindings.largest_resident(self.resident), 1),
                                    dtype=compute_dtype, device=self.device)
        self._scratch_minus = self._scratch[part : 2 * part] if fused_blocks else None
        self.stack = CopyStack(part, compute_dtype, self.device)  # a step's copies of a part, stacked (CUDA)
        self._work_buf: torch.Tensor | None = None
        self._raw_out_buf: torch.Tensor | None = None
        self._raw_out_busy: Any = None  # a host write-back's D2H still reads the encode buffer until then
        self._range_buf: torch.Tensor | None = None
        self._theta_buf: torch.Tensor | None = None
        self._prev_scales: torch.Tensor | None = None  # int8 scales of the block decoded last
        self._prev_scales_of = -1
        self._resident_work: torch.Tensor | None = None
        self._log_cache: tuple[int, int, fused.PendingLog] | None = None
        self._empty_log: fused.PendingLog | None = None
        self._open: Visit | Arrived | None = None
        self._copies = Copies(((0, 0.0),), 0)
        self._step_spans: list[tuple[int, int]] = []
        self.visits = FusedVisits(tiers, bindings, perturbation=perturbation, write_due=self._write_due,
                                  encode_buffer=self._encode_buffer, on_encoded_sent=self._encoded_sent,
                                  range_buffer=self._range_buffer)

    def set_timeline(self, timeline: Any) -> None:
        """Record each bound module's compute span into ``timeline`` (a zo2tier.trace.Timeline; None: stop)."""
        self.timeline = timeline

    # ---- a forward ----------------------------------------------------------------------------------
    def begin(self, copies: Copies) -> None:
        """Before the model's forward: the copies it runs; the resident set gets its pending updates."""
        self._copies = copies
        self._step_spans = self.stack.spans(copies.groups)  # none: one copy at a time
        record = self.table[self.resident]
        if self.is_fused(record) and record.storage != "int8":
            # the pending updates go into the stored copy in place; each module's views are built from it
            if record.applied_steps < len(self.log):
                self._visit_outside(record, None, None, 0.0, 0)
            self._resident_work = record.data.view(TORCH_DTYPES[record.storage])[: record.numel]
            return
        # the last step's buffer is rebuilt in place (stream-ordered after its last use): one fp32 copy, not two
        self._resident_work = self.materialize(record, scratch=self._resident_work)

    def end(self) -> None:
        """Close the block still open: after each forward (a part never called, or a forward that raised,
        leaves one open; its owed writes are completed)."""
        if self._open is not None:
            self._close(self._open)

    def run(self, binding_index: int, inner: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The proxies' runner: ``inner`` on every copy of the batch with that copy's weights."""
        if self.timeline is None:
            return self._run(binding_index, inner, args, kwargs)
        record = self.table[self.bindings[binding_index].record]
        self.tiers.wait_for(record)  # the wait for the disk is not compute
        with self.timeline.span("compute", record.name):
            return self._run(binding_index, inner, args, kwargs)

    def _run(self, binding_index: int, inner: nn.Module, args: tuple, kwargs: dict) -> Any:
        binding = self.bindings[binding_index]
        record = self.table[binding.record]
        visit = None if binding.record == self.resident else self._open_for(record, binding_index)
        if visit is None:
            views = self._generic_views(binding, self._resident_work)
        elif isinstance(visit, Arrived):  # off the fused path: the block's fp32 working copy
            views = self._generic_views(binding, visit.work)
        else:
            views = self._fused_views(visit, binding, binding_index)
        c = self._copies
        stacked, spans = None, ()
        if visit is not None and self._step_spans:
            stacked, spans = self._stacked(visit, binding), self._step_spans
        out = run_groups(inner, views, args, kwargs, len(c.groups), c.rows, c.other_rows, c.batchless_rows,
                         stacked, spans)
        if visit is not None:
            visit.done.add(binding_index)
            if visit.done >= self.bindings.parts_of[record.index]:
                self._close(visit)
        return out

    def _generic_views(self, binding: Binding, work: torch.Tensor) -> Callable[[int], dict[str, torch.Tensor]]:
        groups = self._copies.groups
        return lambda i: self._views(binding, work, groups[i][1], groups[i][0])

    def _fused_views(self, visit: Visit, binding: Binding, binding_index: int) -> Callable[[int], dict]:
        """Views of each copy. One perturbation (a ± pair, or one copy): one pass replays, writes per the plan
        and builds them. Several: the first pass builds the part's clean θ (ε = 0) into the θ buffer, and each
        pass after it one perturbation's copies from that θ (:meth:`FusedVisits.perturb`)."""
        groups = self._copies.groups
        plus = self._scratch[: binding.numel]
        minus_buf = None if self._scratch_minus is None else self._scratch_minus[: binding.numel]
        first_of = pair_up(groups)
        if len(set(first_of)) == 1:  # MeZO's one ± pair, or the clean copy of an evaluation
            seed, scale = groups[0]
            minus = minus_buf if len(groups) == 2 else None
            self.visits.part_pass(visit, binding, plus, minus, scale, seed)
            self.visits.send_part(visit, binding_index)
            return lambda i: binding.named(plus if i == 0 else minus_buf)
        theta = self._theta_buffer()[: binding.numel]
        self.visits.part_pass(visit, binding, theta, None, 0.0, 0)
        self.visits.send_part(visit, binding_index)
        built = [-1]

        def views(i: int) -> dict[str, torch.Tensor]:
            j = first_of[i]
            seed, scale = groups[j]
            if scale == 0.0:
                return binding.named(theta)
            if built[0] != j:
                paired = j + 1 < len(groups) and first_of[j + 1] == j
                self.visits.perturb(theta, binding, plus, minus_buf if paired else None, scale, seed, self._no_log())
                built[0] = j
            return binding.named(plus if i == j else minus_buf)

        return views

    # ---- stacked copies ------------------------------------------------------------------------------
    def _stacked(self, visit: Visit | Arrived, binding: Binding) -> Callable[[int, int], dict[str, torch.Tensor]]:
        """Copies [a, b) of the binding's weights, stacked: each built into a row of the stack (on the fused path
        from the part's clean θ in the θ buffer, which :meth:`_fused_views` built)."""
        groups = self._copies.groups
        first_of = pair_up(groups)

        def stacked(a: int, b: int) -> dict[str, torch.Tensor]:
            rows = self.stack.rows(b - a, len(groups))[:, : binding.numel]  # (b - a, numel)
            for j in range(a, b):
                seed, scale = groups[j]
                if isinstance(visit, Arrived):
                    self._views(binding, visit.work, scale, seed, out=rows[j - a])
                elif scale == 0.0:
                    rows[j - a].copy_(self._theta_buffer()[: binding.numel])
                elif first_of[j] == j:
                    paired = j + 1 < b and first_of[j + 1] == j
                    self.visits.perturb(self._theta_buffer()[: binding.numel], binding, rows[j - a],
                                        rows[j - a + 1] if paired else None, scale, seed, self._no_log())
            return binding.named_stacked(rows)

        return stacked

    def _views(self, binding: Binding, work: torch.Tensor, scale: float, seed: int,
               out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The binding's θ + scale·z views: of ``work`` (its record's clean weights) where scale is 0 and the
        dtypes match, else built into the scratch (or ``out``, which holds the binding's span) from 0."""
        views = {}
        for slot, local in binding.params:
            n, o = slot.spec.numel, slot.offset
            if scale == 0.0 and work.dtype == self.compute_dtype and out is None:
                view = work[o : o + n]
            else:
                r = o - binding.lo
                view = (self._scratch if out is None else out)[r : r + n]
                if scale == 0.0:
                    view.copy_(work[o : o + n])
                elif fused.available(self.device, work.dtype):
                    fused.arrive(work[o : o + n], param_id=slot.spec.param_id, decay=False, log=self._no_log(),
                                 new_seed=seed, eps=scale, plus=view, minus=None, write_to=None, sr_seed=0,
                                 sr_key=0, sr_offset=0, kind=self.perturbation)
                else:
                    perturb_into(work[o : o + n], view, step_seed=seed, param_id=slot.spec.param_id,
                                 scale=scale, kind=self.perturbation)
            for name in local:
                views[name] = view.view(slot.spec.shape)
        return views

    # ---- visits ------------------------------------------------------------------------------------
    def is_fused(self, record: BlockRecord) -> bool:
        return fused.available(self.device, TORCH_DTYPES[record.storage])

    def _open_for(self, record: BlockRecord, binding_index: int) -> Visit | Arrived:
        """The open visit of ``record``; a part run twice, or another block's part, closes the one open."""
        visit = self._open
        if visit is not None and (visit.record.index != record.index or binding_index in visit.done):
            self._close(visit)
            visit = None
        if visit is None:
            if self.is_fused(record):
                visit = self._open_visit(record, in_forward=True)
            else:  # written back and released on arrival
                visit = Arrived(record, self.materialize(record, scratch=self.work), set())
            self._open = visit
        return visit

    def _open_visit(self, record: BlockRecord, force_write: bool = False, in_forward: bool = False) -> Visit:
        n_log = len(self.log)
        return self.visits.open(record, pending_log=self._pending_log, n_log=n_log,
                                sr_seed=step_seed(self.seed ^ SR_SALT, n_log), force_write=force_write,
                                in_forward=in_forward)

    def _close(self, visit: Visit | Arrived) -> None:
        if self._open is visit:
            self._open = None
        if isinstance(visit, Visit):
            self.visits.close(visit, self._scratch, len(self.log), self.resident)

    def _visit_outside(self, record: BlockRecord, plus: torch.Tensor | None, minus: torch.Tensor | None,
                       eps: float, seed: int, force_write: bool = False) -> None:
        """A whole visit of ``record`` outside the forward (``plus=None``: θ not needed)."""
        self.end()
        visit = self._open_visit(record, force_write)
        self.visits.whole_visit(visit, plus, minus, eps, seed, self._scratch, len(self.log), self.resident)

    # ---- the generic path: decode, replay, write back -------------------------------------------------
    def materialize(self, record: BlockRecord, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The block's clean fp32 weights with every logged update applied (written back if due)."""
        device_fp32 = record.tier == "device" and record.storage == "fp32"
        if device_fp32:
            work = record.data.view(torch.float32)
        else:
            work = scratch[: record.numel] if scratch is not None else torch.empty(record.numel, device=self.device)
        if self.is_fused(record):  # the GPU replays with the same kernel the step uses
            self._visit_outside(record, work, None, 0.0, 0)
            return work
        raw, staging = self.tiers.fetch(record)
        if not device_fp32:
            raw = raw.to(self.device)  # blocking from host staging
            decode(raw, record.storage, record.numel, work)
            self._keep_scales(record, raw)
        self.tiers.release(staging)
        if record.index < self.resident:
            self.tiers.prefetch_after(record.index)
        pending = len(self.log) - record.applied_steps
        self._replay(record, work)
        if self._write_due(record, pending):
            self.write_back(record, work)
        return work

    def _replay(self, record: BlockRecord, work: torch.Tensor) -> None:
        for entry in self.log[record.applied_steps :]:
            if entry.lr == 0.0:  # θ − 0·(…) is θ: skip the RNG pass
                continue
            for slot in record.slots:
                n, o = slot.spec.numel, slot.offset
                apply_update_(work[o : o + n], step_seed=entry.step_seed, param_id=slot.spec.param_id,
                              lr=entry.lr, projected_grad=entry.projected_grad,
                              weight_decay=entry.weight_decay if slot.spec.decay else 0.0, kind=self.perturbation)
        if record.tier == "device" and record.storage == "fp32":
            self.table.mark_applied(record, len(self.log))

    def _write_due(self, record: BlockRecord, pending: int) -> bool:
        return self.schedule.due(record, pending, len(self.log))

    def write_back(self, record: BlockRecord, work: torch.Tensor) -> None:
        """Encode ``work`` (the block's clean weights) and hand it to the block's tier."""
        if record.tier == "device" and record.storage == "fp32":  # work is the stored copy itself
            self.table.mark_applied(record, len(self.log))
            return
        raw = self._encode_buffer(record.stored_bytes)
        prev = None
        if record.storage == "int8" and self._prev_scales_of == record.index:
            prev = self._prev_scales[: int8_scales(raw, record.numel).numel()]
        encode(work, record.storage, raw, sr_seed=step_seed(self.seed ^ SR_SALT, len(self.log)),
               sr_key=record.index, prev_scales=prev)
        # applied once stored (disk: once written); a host D2H reads raw until the event
        self._raw_out_busy = self.tiers.write_back(record, raw, n_steps=len(self.log))

    def _keep_scales(self, record: BlockRecord, raw: torch.Tensor) -> None:
        """Remember an int8 block's stored scales so its write-back keeps every group that still fits."""
        if record.storage != "int8":
            return
        scales = int8_scales(raw, record.numel)
        if self._prev_scales is None or self._prev_scales.numel() < scales.numel():
            self._prev_scales = torch.empty(scales.numel(), dtype=torch.float32, device=self.device)
        self._prev_scales[: scales.numel()].copy_(scales)
        self._prev_scales_of = record.index

    def flush(self) -> None:
        """Write every block with pending updates back to its tier (not the disk blocks of a shared disk)."""
        self.tiers.drain()  # settle the write-backs in flight first (raises a failed one's error)
        for record in self.table:
            if record.applied_steps < len(self.log) and not (self.schedule.keep_disk and record.tier == "disk"):
                if self.is_fused(record):  # the kernel pass writes it back (its θ lands in the scratch)
                    self._visit_outside(record, None, None, 0.0, 0, force_write=True)
                    continue
                work = self.materialize(record, scratch=self.work)
                if record.applied_steps < len(self.log) and record.write_future is None:
                    self.write_back(record, work)
        self.tiers.drain()

    # ---- buffers -------------------------------------------------------------------------------------
    @property
    def buffers_allocated(self) -> dict[str, bool]:
        """Which lazily allocated buffers exist: ``fp32_block`` (:attr:`work`) and ``encode``."""
        return {"fp32_block": self._work_buf is not None, "encode": self._raw_out_buf is not None}

    @property
    def work(self) -> torch.Tensor:
        """An fp32 buffer of the largest block. The generic path and int8 write-backs use it; the fused CUDA
        path with float storage never does, so it is allocated on first use, not up front (at OPT-13B that
        is 1.26 GB of GPU memory a fp16 run does not hold)."""
        if self._work_buf is None:
            self._work_buf = torch.empty(self._largest, dtype=torch.float32, device=self.device)
        return self._work_buf

    def _encode_buffer(self, n_bytes: int) -> torch.Tensor:
        """The first ``n_bytes`` of the encoded write-back buffer (the largest user's stored bytes). int8 and
        the generic path encode into it; the fused float path writes back in place and never allocates it.
        A D2H copy of the last host write-back still reading it is waited for (on the compute stream)."""
        if self._raw_out_buf is None:
            users = [r for r in self.table if not self.is_fused(r) or r.storage == "int8"]
            size = max(r.stored_bytes for r in users or self.table)
            self._raw_out_buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        if self._raw_out_busy is not None:
            torch.cuda.current_stream(self.device).wait_event(self._raw_out_busy)
            self._raw_out_busy = None
        return self._raw_out_buf[:n_bytes]

    def _encoded_sent(self, event: Any) -> None:
        self._raw_out_busy = event

    def _theta_buffer(self) -> torch.Tensor:
        """Room for the largest part's clean θ in the compute dtype (steps with several perturbations)."""
        if self._theta_buf is None:
            self._theta_buf = torch.empty(max(self.bindings.largest_part(self.resident), 1), dtype=self.compute_dtype,
                                          device=self.device)
        return self._theta_buf

    def _range_buffer(self) -> torch.Tensor:
        if self._range_buf is None:
            self._range_buf = torch.empty(WRITE_BACK_RANGE_NUMEL + 4, dtype=torch.float32, device=self.device)
        return self._range_buf

    def _no_log(self) -> fused.PendingLog:
        if self._empty_log is None:
            self._empty_log = fused.PendingLog.build([], self.device)
        return self._empty_log

    def _pending_log(self, start: int) -> fused.PendingLog:
        end = len(self.log)
        if self._log_cache is None or self._log_cache[:2] != (start, end):
            self._log_cache = (start, end, fused.PendingLog.build(self.log[start:end], self.device))
        return self._log_cache[2]

