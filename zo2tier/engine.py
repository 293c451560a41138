"""The tiered MeZO engine: one step is prefetch -> replay pending updates -> perturb ± -> forward -> log.

Each block is visited once per forward. On arrival its stored copy is decoded into an fp32 working copy on
the compute device, the update log's pending entries are replayed on it (z regenerated from the keys),
it is written back when its log is long enough (every block on the device, every ``write_back_every``
visits elsewhere), and θ+εz / θ−εz are built in scratch for the two halves of the doubled batch. θ itself
is never perturbed in place, so nothing drifts.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from zo2tier.budget import BudgetLike, TierBudget
from zo2tier import checkpoint as _store_glue
from zo2tier.config import MeZOConfig
from zo2tier.distributed import DataParallel, attach as _attach_data_parallel
from zo2tier.model.blocks import describe
from zo2tier.model.loading import StateSource, in_memory_source, pretrained_skeleton
from zo2tier.model.proxy import ModuleProxy, install, run_dual
from zo2tier.plan import DEFAULT_HOST_LOOKAHEAD, Plan
from zo2tier.planning import make_plan
from zo2tier import shared_disk as _shared_disk
from zo2tier.store.zstd import Zstd, parse_compress
from zo2tier.tiers.codec import (INT8_GROUP, WRITE_BACK_RANGE_NUMEL, check_storage, decode, dtype_name, encode,
                                 encode_int8_range, encoded_bytes, int8_scales)
from zo2tier.tiers.manager import TierManager
from zo2tier.tiers.records import BlockRecord, BlockTable, ParamSlot
from zo2tier.trace import Timeline
from zo2tier.tiers.write_back import check_max_log as _check_max_log, resolve_write_back
from zo2tier.tiers.store_dir import claim_disk_dir, release_disk_dir
from zo2tier.zo import fused
from zo2tier.zo.kernels import apply_update_, perturb_into
from zo2tier.zo.rng import step_seed
from zo2tier.zo.update import LogEntry, causal_lm_loss

RESIDENT = "<resident>"
_DISK_LOOKAHEAD = 2  # disk reads in flight by default (lookahead_blocks=None)
# encode int8 write-back ranges with the Triton encoder (zo2tier.zo.fused.encode_int8) instead of torch ops:
# the torch codec's bytes, 0.71 -> 0.46 s per OPT-13B int8 host step on the H100 (docs/io.md).
# ZO2TIER_FUSED_INT8_ENCODE=0 goes back to the torch codec.
FUSED_INT8_ENCODE = os.environ.get("ZO2TIER_FUSED_INT8_ENCODE", "1") != "0"
# An int8 block written back during a forward is replayed once, part by part: each part's pass builds its
# θ±εz and re-encodes its span (parts on int8 group boundaries). 0: replay the whole block for the encode at
# its first part, then again per part for θ±εz.
INT8_WRITE_BY_PART = os.environ.get("ZO2TIER_INT8_WRITE_BY_PART", "1") != "0"
# bind decoder layers part by part (ModelLayout.parts): θ±εz scratch the size of the largest part, not the
# layer. ZO2TIER_SPLIT_LAYERS=0 binds whole layers (for comparison).
SPLIT_LAYERS = os.environ.get("ZO2TIER_SPLIT_LAYERS", "1") != "0"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one MeZO step measured."""

    step: int
    loss_plus: float
    loss_minus: float
    projected_grad: float
    skipped: bool = False  # a non-finite loss: no update was logged
    n_skipped: int = 0  # skipped steps so far in this engine


@dataclass(frozen=True)
class _Binding:
    """A proxied module: the record holding its weights, and its (slot, local names) pairs. A decoder layer
    is bound part by part (its attention, MLP, norms: ``ModelLayout.parts``); ``lo`` and ``numel`` are the
    part's span in its record, and its θ±εz views start at 0 in the scratch."""

    record: int
    params: tuple[tuple[ParamSlot, tuple[str, ...]], ...]
    lo: int = 0
    numel: int = 0


def _tile_on_groups(parts: list[_Binding], numel: int) -> bool:
    """True if ``parts`` tile a block of ``numel`` elements and each starts on an int8 group (so each part
    encodes on its own)."""
    spans = sorted((b.lo, b.lo + b.numel) for b in parts)
    return (bool(spans) and spans[0][0] == 0 and spans[-1][1] == numel
            and all(a[1] == b[0] for a, b in itertools.pairwise(spans)) and all(lo % INT8_GROUP == 0 for lo, _ in spans))


@dataclass
class _Open:
    """A block between its first and its last part in this forward: fetched, its write-back decided."""

    record: BlockRecord
    done: set  # binding indices run
    work: torch.Tensor | None = None  # generic path: the block's clean fp32 weights
    raw: torch.Tensor | None = None  # fused path: the stored bytes on the device
    staging: torch.Tensor | None = None
    stored: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    write: bool = False
    log: Any = None
    sr_seed: int = 0
    encoded: torch.Tensor | None = None
    written: bool = False  # the int8 write-back has been handed to its tier already
    by_part: bool = False  # int8 write-back: each part's pass re-encodes its span (see INT8_WRITE_BY_PART)
    sent: set = field(default_factory=set)  # bindings whose bytes went down to the host copy already
    landed: Any = None  # the event of the last range sent down


class ZOEngine:
    """Tiered MeZO-SGD over device / host / disk for any Hugging Face decoder-only causal LM.

    Example::

        engine = ZOEngine(model, budget={"device": "8GiB", "host": "16GiB", "disk": "100GiB"},
                          disk_dir="runs/disk", device="cuda:0", config=MeZOConfig(lr=1e-6))
        r = engine.step({"input_ids": ids, "attention_mask": mask, "labels": ids})
        engine.close()

    ``lookahead_blocks``: blocks fetched ahead of the one computing. The disk tier keeps that many reads in
    flight (default 2). On CUDA, host-tier blocks are uploaded into ``lookahead_blocks + 1`` device slots of
    the largest host block's stored size, never more than there are host blocks; a block written back is
    updated in its slot and copied down from there, part by part as each part's kernel pass writes it. The
    default (None) is 2 slots (one computing and going down, one uploading): the host tier is bound by the
    bus, and a third slot measured no faster (docs/io.md).

    Each decoder layer is run part by part (attention, MLP or its projections, norms: ``ModelLayout.parts``),
    with θ±εz built for one part at a time, so the GPU holds the largest part's perturbed copies rather than
    the layer's. On CUDA, ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (the ``zo2tier`` CLI sets it
    when unset) keeps the allocator's cache close to what is in use.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        budget: BudgetLike,
        disk_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        config: MeZOConfig | None = None,
        placement: Mapping[str, str] | None = None,
        storage: Mapping[str, str] | None = None,
        write_back_every: int | Mapping[str, int] | None = None,
        max_log: int | None = None,
        compress: str | Zstd | Mapping[str, str | Zstd | None] | None = None,
        lookahead_blocks: int | None = None,
        data_parallel: DataParallel | bool | None = None,
        _source: StateSource | None = None,
    ) -> None:
        # data_parallel: None = data-parallel over WORLD iff torch.distributed is initialised with > 1 rank;
        # False = never; DataParallel(...) = explicit (zo2tier/distributed.py, docs/scaling.md "Multi-node").
        self.config = config or MeZOConfig()
        if not isinstance(self.config, MeZOConfig):
            raise ValueError(f"config must be a MeZOConfig, got {type(self.config).__name__}")
        self.device = torch.device(device)
        self.budget = TierBudget.parse(budget)
        self.layout = describe(model)
        self._vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
        self.compute_dtype = self.layout.params[0].dtype
        default = dtype_name(self.compute_dtype)
        self.storage = {t: check_storage((storage or {}).get(t, default)) for t in ("device", "host", "disk")}
        unknown = set(storage or {}) - set(self.storage)
        if unknown:
            raise ValueError(f"storage names unknown tier(s) {sorted(unknown)}; use device, host, disk")
        # K per tier (host, disk): written back every K steps, staggered by block; see docs/io.md
        self.write_back_every = resolve_write_back(write_back_every, self.device, self.storage)
        self.max_log = _check_max_log(max_log)
        # disk-tier blocks as zstd frames: "zstd", {"disk": "zstd"} or Zstd(level=, frame_bytes=); default
        # off (zo2tier.store.zstd.DEFAULT_DISK_COMPRESS; docs/io.md "zstd on the disk tier")
        self.compress = parse_compress(compress)
        self._host_lookahead = self._resolve_host_lookahead(lookahead_blocks)
        self.plan = self._make_plan(placement, self._host_lookahead)
        self.blocks: list[str] = list(self.layout.block_names)
        self.placement: dict[str, str] = dict(self.plan.placement)
        needs_disk = any(t == "disk" for t in self.placement.values())
        self._dp = _attach_data_parallel(data_parallel)
        if self._dp is not None:  # each rank its own disk directory disk_dir/rank{r}, or one shared disk_dir
            disk_dir = self._dp.rank_dir(disk_dir)
        if needs_disk and disk_dir is None:
            raise ValueError("some blocks are placed on disk but disk_dir is None; pass disk_dir='runs/disk'")
        # shared_disk: rank 0 owns (locks, writes) disk_dir; the other ranks only read it (zo2tier/shared_disk.py)
        self._shared_disk = needs_disk and self._dp is not None and self._dp.spec.shared_disk
        self._disk_follower = self._shared_disk and self._dp.rank != 0
        if self._shared_disk and self.compress is not None:
            raise ValueError("compress='zstd' with DataParallel(shared_disk=True) is not supported yet; "
                             "drop one of them (compress=None, or shared_disk=False: each rank its own copy)")
        if self._disk_follower:
            self.disk_dir = os.path.abspath(os.fspath(disk_dir))
        else:
            self.disk_dir = claim_disk_dir(os.fspath(disk_dir)) if needs_disk else None

        self.model = model.eval()  # dropout would give the two perturbed passes different masks
        self.log: list[LogEntry] = []
        self._timeline: Timeline | None = None  # set while trace() records
        self.n_skipped = 0
        self.extra_state: dict = {}  # the caller's dict from save_checkpoint, given back by resume
        self._mode: tuple[str, int, float] = ("eval", 0, 0.0)
        self._rows = 0
        self._closed = False
        try:
            with _shared_disk.owner_first(self) if self._shared_disk else contextlib.nullcontext():
                self._build(model, _source or in_memory_source(model), lookahead_blocks)
        except BaseException:  # e.g. the disk filled while the store was written: let other processes in
            if getattr(self, "store", None) is not None:
                self.store.close()
            if self.disk_dir is not None and not self._disk_follower:
                release_disk_dir(self.disk_dir)
            raise

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "ZOEngine":
        """Build the skeleton on the meta device and stream each block from the checkpoint into its tier.

        The whole model never sits in host RAM: at most one block's tensors are in memory at a time.
        Accepts the same keywords as :class:`ZOEngine`, plus ``dtype`` (default: the checkpoint's).
        """
        if _store_glue.is_store(path):  # a zo2tier store (docs/store.md): see from_store
            return cls.from_store(path, **kwargs)
        model, source = pretrained_skeleton(os.fspath(path), dtype=kwargs.pop("dtype", None))
        return cls(model, _source=source, **kwargs)

    @classmethod
    def from_store(cls, path: str | os.PathLike, **kwargs: Any) -> "ZOEngine":
        """Build an engine on a zo2tier store (``zo2tier convert`` output, or an engine's ``disk_dir``).

        The store is used in place: its files are the disk tier, training updates it copy-on-write, and
        ``close()`` / ``save_checkpoint()`` commit its manifest. Pending updates in the store are replayed.
        Same keywords as :class:`ZOEngine` (``disk_dir`` defaults to the store), plus ``dtype`` and
        ``verify_reads`` (check each block's xxh3 when read; default True).

        Example::

            engine = ZOEngine.from_store("stores/opt-1.3b", budget="device=4GiB,host=8GiB,disk=100GiB")
        """
        return _store_glue.from_store(cls, path, **kwargs)

    @classmethod
    def resume(cls, path: str | os.PathLike, **kwargs: Any) -> "ZOEngine":
        """Continue exactly where :meth:`save_checkpoint` left off; ``engine.extra_state`` is the saved dict.

        The checkpoint's config, placement, storage, write-back schedule and budget are the defaults;
        keywords override them (give ``device`` and, for the disk tier, nothing else is needed).

        Example::

            engine = ZOEngine.resume("runs/ckpt")
            start = engine.extra_state["data_position"]
        """
        return _store_glue.resume(cls, path, **kwargs)

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict | None = None) -> str:
        """Make the run durable: commit the store and write ``path/checkpoint.json``; returns ``path``.

        ``extra_state`` is a JSON-able dict the caller owns (e.g. the data position), given back by
        :meth:`resume`. Block files are referenced, not copied: between full write-backs a checkpoint is a
        few KB. Device/host blocks are copied into the store when needed (the first time, when stored in a
        narrow dtype and changed, or when their log tail is long). Only the latest checkpoint of a store
        can be resumed: a later one replaces block files an earlier one names.
        """
        if self._disk_follower:
            raise ValueError("with DataParallel(shared_disk=True) only rank 0 of the group owns the store and saves "
                             "checkpoints (every rank holds the same weights); call save_checkpoint on rank 0 only")
        return _store_glue.save_checkpoint(self, path, extra_state)

    def export(self, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 << 30) -> str:
        """Write the current weights (every pending update applied) as a Hugging Face safetensors model.

        ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it; streamed one block at a time.
        """
        from zo2tier.store.export import export_engine

        return export_engine(self, out_dir, max_shard_bytes=max_shard_bytes)

    @staticmethod
    def block_names(model: nn.Module) -> list[str]:
        """The movable blocks of ``model`` in execution order, without building an engine."""
        return list(describe(model).block_names)

    def _resolve_host_lookahead(self, lookahead: int | None) -> int:
        """Host-tier uploads ahead of the block computing (slots = this + 1); see the class docstring."""
        if lookahead is not None:
            return max(0, lookahead)
        return DEFAULT_HOST_LOOKAHEAD

    def _make_plan(self, placement: Mapping[str, str] | None, lookahead: int) -> Plan:
        # what the planner saw: zo2tier.predict.predict_step(engine.plan_input, engine.plan, ...)
        self.plan_input, plan = make_plan(
            self.layout, self.budget, placement=placement, compute_dtype=self.compute_dtype, storage=self.storage,
            lookahead_blocks=lookahead, fused=fused.available(self.device, self.compute_dtype),
            vocab_size=self._vocab_size, split_layers=SPLIT_LAYERS)
        return plan

    def _build(self, model: nn.Module, source: StateSource, lookahead: int | None) -> None:
        layout, modules = self.layout, dict(model.named_modules())
        alias_of: dict[str, list[str]] = {}
        for alias, canonical in layout.aliases.items():
            alias_of.setdefault(canonical, []).append(alias)
        records: list[BlockRecord] = []
        for i, name in enumerate(layout.block_names):
            records.append(self._record(i, name, self.placement[name], layout.params_under(name)))
        in_blocks = {p.param_id for r in records for p in (s.spec for s in r.slots)}
        resident_params = [p for p in layout.params if p.param_id not in in_blocks]
        records.append(self._record(len(records), RESIDENT, "device", resident_params))
        self.table = BlockTable(records)
        self.tiers = TierManager(self.table, device=self.device, disk_dir=self.disk_dir,
                                 lookahead_blocks=_DISK_LOOKAHEAD if lookahead is None else lookahead,
                                 upload_slots=self._host_lookahead + 1, compress=self.compress)
        # the disk_dir is a store; a shared-disk follower only reads the owner's (by path, see below)
        self.store = None if self._disk_follower else _store_glue.open_engine_store(self, records, source)
        self.tiers.store = self.store
        self.tiers.open()
        for record in records:  # one block at a time: load, encode, place
            if self._disk_follower and record.tier == "disk":
                continue
            if _store_glue.place_from_store(self, record, source):
                continue
            flat = torch.empty(record.numel, dtype=torch.float32, device=self.device)
            for slot in record.slots:
                flat[slot.offset : slot.offset + slot.spec.numel] = source.get(slot.spec.name).reshape(-1)
            raw = torch.empty(record.stored_bytes, dtype=torch.uint8, device=self.device)
            encode(flat, record.storage, raw, sr_seed=0, sr_key=record.index, stochastic=False)
            self.tiers.put_initial(record, raw)
            _store_glue.persist_initial(self, record, raw)
            del flat, raw
        self.tiers.drain()
        if self._disk_follower:
            _shared_disk.follow(self)
        _store_glue.finish_initial(self, source)

        self.bindings: list[_Binding] = []
        names_by_id: dict[int, list[str]] = {}
        for p in layout.params:
            names_by_id[p.param_id] = [p.name, *alias_of.get(p.name, [])]
        self._parts_of: dict[int, set[int]] = {}  # record index -> its bindings
        for i, name in enumerate(layout.block_names):
            for part in layout.parts.get(name, (name,)) if SPLIT_LAYERS else (name,):
                self._bind(model, modules[part], part, records[i], names_by_id)
                self._parts_of.setdefault(i, set()).add(len(self.bindings) - 1)
        # blocks whose parts tile them on int8 groups: an int8 write-back can re-encode them part by part
        self._parts_on_groups = {i for i, parts in self._parts_of.items()
                                 if _tile_on_groups([self.bindings[b] for b in parts], records[i].numel)}
        for name in layout.resident_names:
            self._bind(model, modules[name], name, records[-1], names_by_id)
        for module in modules.values():  # the engine owns the weights now; buffers move to the device
            for key, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for key, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[key] = b.to(self.device)
        self._buffers_by_key = {k: v for k, v in source.buffer_keys().items()}
        self._largest = max(r.numel for r in records)
        self._work_buf: torch.Tensor | None = None  # fp32 block buffer, allocated on first use (see _work)
        # θ±εz scratch: a block part's θ+εz and θ−εz side by side (the fused path builds both in one pass), or
        # one resident module's view (built per half); the generic path builds one half at a time
        part = max(b.numel for b in self.bindings if b.record < len(records) - 1) if len(records) > 1 else 0
        resident = max((b.numel for b in self.bindings if b.record == len(records) - 1), default=0)
        self._fused_blocks = any(self._is_fused(r) for r in records[:-1])
        self._scratch = torch.empty(max(2 * part if self._fused_blocks else part, resident, 1),
                                    dtype=self.compute_dtype, device=self.device)
        self._scratch_minus = self._scratch[part : 2 * part] if self._fused_blocks else None
        self._open: _Open | None = None
        self._rows = self._flat_rows = 0
        self._log_cache: tuple[int, int, fused.PendingLog] | None = None
        self._raw_out_buf: torch.Tensor | None = None  # encoded write-back buffer, allocated on first use
        self._raw_out_busy: torch.cuda.Event | None = None  # a host write-back's D2H still reads it until then
        self._resident_work: torch.Tensor | None = None
        self._range_buf: torch.Tensor | None = None  # fp32 room for one range of an int8 write-back
        self._prev_scales: torch.Tensor | None = None  # int8 scales of the block decoded last
        self._prev_scales_of = -1

    def _record(self, index: int, name: str, tier: str, params: list) -> BlockRecord:
        slots, offset = [], 0
        for spec in params:
            slots.append(ParamSlot(spec, offset, ()))
            offset += spec.numel
        return BlockRecord(index, name, tier, self.storage[tier], tuple(slots), offset)

    def _bind(self, model: nn.Module, module: nn.Module, prefix: str, record: BlockRecord, names_by_id) -> None:
        pairs = []
        for slot in record.slots:
            local = tuple(n[len(prefix) + 1 :] for n in names_by_id[slot.spec.param_id] if n.startswith(prefix + "."))
            if local:
                pairs.append((slot, local))
        # the span of the module's weights in its record: its views start at 0 in the scratch
        lo = min((slot.offset for slot, _ in pairs), default=0)
        numel = max((slot.offset + slot.spec.numel for slot, _ in pairs), default=0) - lo
        self.bindings.append(_Binding(record.index, tuple(pairs), lo, numel))
        install(model, prefix, ModuleProxy(module, len(self.bindings) - 1, self._run))

    # ---- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        batch: Mapping[str, torch.Tensor],
        *,
        lr: float | None = None,
        loss_fn: Callable[[torch.Tensor, Mapping[str, Any]], float] | None = None,
    ) -> StepResult:
        """One MeZO-SGD step on ``batch`` (``input_ids``, optional ``attention_mask`` and ``labels``).

        ``loss_fn(logits, batch) -> float``, if given, replaces the causal-LM loss: it is called once per
        half with that half's logits (B, T, V) and ``batch`` as passed in (extra keys are allowed).
        Data-parallel engines take the global batch and run their shard (zo2tier/distributed.py).
        """
        if self._dp is not None:
            return self._dp.step(self, batch, lr=lr, loss_fn=loss_fn)
        self._check_open()
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0
                               or not math.isfinite(lr)):
            raise ValueError(f"lr={lr!r} must be a finite number >= 0; pass e.g. lr=1e-6, or None for config.lr")
        ids, mask, labels = _unpack(batch, self.device)
        t = len(self.log)
        seed = step_seed(self.config.seed, t)
        self._mode, self._rows, self._flat_rows = ("perturb", seed, self.config.eps), 2 * ids.shape[0], 2 * ids.numel()
        self._prepare_resident()
        doubled_mask = None if mask is None else torch.cat([mask, mask])
        logits = self.model(input_ids=torch.cat([ids, ids]), attention_mask=doubled_mask, use_cache=False).logits
        self._close_open()
        if loss_fn is None:
            loss_plus = causal_lm_loss(logits[: ids.shape[0]], labels)
            loss_minus = causal_lm_loss(logits[ids.shape[0] :], labels)
        else:
            loss_plus = float(loss_fn(logits[: ids.shape[0]], batch))
            loss_minus = float(loss_fn(logits[ids.shape[0] :], batch))
        g = (loss_plus - loss_minus) / (2 * self.config.eps)
        skipped = not (math.isfinite(loss_plus) and math.isfinite(loss_minus) and math.isfinite(g))
        if skipped:  # the update is logged with lr 0: it never reaches the weights
            self.n_skipped += 1
            _log.warning("step %d skipped: non-finite loss (loss+ %s, loss- %s); %d step(s) skipped so far",
                         t, loss_plus, loss_minus, self.n_skipped)
            g = 0.0
        step_lr = self.config.lr if lr is None else lr
        self.log.append(LogEntry(t, seed, 0.0 if skipped else g, 0.0 if skipped else step_lr, self.config.weight_decay))
        return StepResult(t, loss_plus, loss_minus, g, skipped, self.n_skipped)

    @torch.no_grad()
    def evaluate(self, batch: Mapping[str, torch.Tensor]) -> float:
        """Unperturbed loss on ``batch``, through the same tiers, with every update applied."""
        return causal_lm_loss(self.logits(batch), _unpack(batch, self.device)[2])

    @torch.no_grad()
    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unperturbed logits (B, T, V) on ``batch``, with every update applied."""
        self._check_open()
        ids, mask, _ = _unpack(batch, self.device)
        self._mode, self._rows, self._flat_rows = ("eval", 0, 0.0), ids.shape[0], ids.numel()
        self._prepare_resident()
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        self._close_open()
        return logits

    def _prepare_resident(self) -> None:
        record = self.table[len(self.table) - 1]
        if self._is_fused(record) and record.storage != "int8":
            # the pending updates go into the stored copy in place; each module's θ±εz views are built from it
            if record.applied_steps < len(self.log):
                self._arrive_fused(record, None, None, 0.0, 0)
            self._resident_work = record.data.view(_TORCH_DTYPES[record.storage])[: record.numel]
            return
        # the last step's buffer is rebuilt in place (stream-ordered after its last use): one fp32 copy, not two
        self._resident_work = self._arrive(record, scratch=self._resident_work)

    def _close_open(self) -> None:
        """Close the block still open: before and after each forward (a part never called, or a forward that
        raised, leaves one open; its owed in-place writes are completed)."""
        if self._open is not None:
            self._close(self._open)

    @property
    def _work(self) -> torch.Tensor:
        """An fp32 buffer of the largest block. The generic path and int8 write-backs use it; the fused CUDA
        path with float storage never does, so it is allocated on first use, not up front (at OPT-13B that
        is 1.26 GB of GPU memory a fp16 run does not hold)."""
        if self._work_buf is None:
            self._work_buf = torch.empty(self._largest, dtype=torch.float32, device=self.device)
        return self._work_buf

    def _raw_out(self, n_bytes: int) -> torch.Tensor:
        """The first ``n_bytes`` of the encoded write-back buffer (the largest user's stored bytes). int8 and
        the generic path encode into it; the fused float path writes back in place and never allocates it.
        A D2H copy of the last host write-back still reading it is waited for (on the compute stream)."""
        if self._raw_out_buf is None:
            users = [r for r in self.table if not self._is_fused(r) or r.storage == "int8"]  # the others: in place
            size = max(r.stored_bytes for r in users or self.table)
            self._raw_out_buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        if self._raw_out_busy is not None:
            torch.cuda.current_stream(self.device).wait_event(self._raw_out_busy)
            self._raw_out_busy = None
        return self._raw_out_buf[:n_bytes]

    def _run(self, binding_index: int, inner: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self._timeline is None:
            return self._run_block(binding_index, inner, args, kwargs)
        with self._timeline.span("compute", self.table[self.bindings[binding_index].record].name):
            return self._run_block(binding_index, inner, args, kwargs)

    def _run_block(self, binding_index: int, inner: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Run one bound module (a resident module, or a part of a block) on both halves of the batch."""
        binding = self.bindings[binding_index]
        record = self.table[binding.record]
        kind, seed, eps = self._mode
        opened = None if record.name == RESIDENT else self._open_for(record, binding_index)
        if opened is None or opened.work is not None:
            # views of clean weights, built per half in _scratch: the resident set's stored copy (its modules
            # never contain blocks), or a block's fp32 copy on the generic path
            work = self._resident_work if opened is None else opened.work

            def views(scale: float) -> dict[str, torch.Tensor]:
                return self._views(binding, work, self._scratch, scale, seed)
        else:  # the fused path: one kernel pass builds the part's θ+εz and θ−εz from the stored copy
            plus = self._scratch[: binding.numel]
            minus = None if kind == "eval" else self._scratch_minus[: binding.numel]
            self._part_pass(opened, binding, plus, minus, 0.0 if kind == "eval" else eps, seed)
            self._send_part(opened, binding_index)

            def views(scale: float) -> dict[str, torch.Tensor]:
                return _named(binding, plus if scale >= 0 else minus)

        if kind == "eval":
            out = run_dual_eval(inner, views(0.0), args, kwargs)
        else:
            out = run_dual(inner, lambda half: views(eps if half == 0 else -eps), args, kwargs, self._rows,
                           self._flat_rows)
        if opened is not None:
            opened.done.add(binding_index)
            if opened.done >= self._parts_of[record.index]:
                self._close(opened)
        return out

    def _is_fused(self, record: BlockRecord) -> bool:
        return fused.available(self.device, _TORCH_DTYPES[record.storage])

    def _no_log(self) -> "fused.PendingLog":
        if getattr(self, "_empty_log", None) is None:
            self._empty_log = fused.PendingLog.build([], self.device)
        return self._empty_log

    def _pending_log(self, start: int) -> "fused.PendingLog":
        end = len(self.log)
        if self._log_cache is None or self._log_cache[:2] != (start, end):
            self._log_cache = (start, end, fused.PendingLog.build(self.log[start:end], self.device))
        return self._log_cache[2]

    # ---- a block's visit: open at its first part, close after its last --------------------------------
    def _open_for(self, record: BlockRecord, binding_index: int) -> _Open:
        """The open visit of ``record``; a part run twice, or another block's part, closes the one open."""
        opened = self._open
        if opened is not None and (opened.record.index != record.index or binding_index in opened.done):
            self._close(opened)
            opened = None
        if opened is None:
            opened = self._open = self._begin_block(record, in_forward=True)
        return opened

    def _begin_block(self, record: BlockRecord, force_write: bool = False, in_forward: bool = False) -> _Open:
        """Fetch ``record`` and decide its write-back (due, or ``force_write``). Float blocks are written in
        place by each part's pass. An int8 block written back in a forward with more than one pending update
        is re-encoded by each part's pass too, where its parts sit on int8 groups; otherwise it is replayed
        and re-encoded now, range by range."""
        if not self._is_fused(record):
            return _Open(record, set(), work=self._arrive(record, scratch=self._work))
        raw, staging = self.tiers.fetch(record)
        raw = raw.to(self.device)
        dtype = _TORCH_DTYPES[record.storage]
        stored = raw[: record.numel].view(dtype) if dtype == torch.int8 else raw.view(dtype)[: record.numel]
        pending = len(self.log) - record.applied_steps
        opened = _Open(record, set(), raw=raw, staging=staging, stored=stored,
                       scales=int8_scales(raw, record.numel) if dtype == torch.int8 else None,
                       write=pending > 0 and (force_write or self._write_due(record, pending)),
                       log=self._pending_log(record.applied_steps),
                       sr_seed=step_seed(self.config.seed ^ 0x5A5A5A5A, len(self.log)))
        if opened.write and dtype == torch.int8:  # the codec writes int8 (its groups span parameters)
            opened.encoded = self._raw_out(record.stored_bytes)
            # one pending update: a second replay costs less than the D2H the next block might wait for
            opened.by_part = (in_forward and INT8_WRITE_BY_PART and pending > 1
                              and record.index in self._parts_on_groups)
            if opened.by_part:
                return opened
            self._int8_write_pass(record, stored, opened.scales, opened.log, opened.encoded, opened.sr_seed)
            if record.tier == "host":  # down now, while the parts compute (the next block's encode waits for it)
                self._raw_out_busy = self.tiers.write_back(record, opened.encoded, n_steps=len(self.log))
                opened.written = True
        return opened

    def _send_part(self, opened: _Open, binding_index: int) -> None:
        """A host block written back part by part (in place, or int8 re-encoded per part) goes down part by
        part, each as soon as its pass wrote it."""
        record = opened.record
        per_part = opened.encoded is None or opened.by_part
        if not (opened.write and per_part and record.tier == "host" and self.tiers.sends_ranges):
            return
        binding, size = self.bindings[binding_index], _TORCH_DTYPES[record.storage].itemsize
        source = opened.raw if opened.encoded is None else opened.encoded
        opened.landed = self.tiers.send_range(record, source, binding.lo * size, (binding.lo + binding.numel) * size)
        opened.sent.add(binding_index)

    def _part_pass(self, opened: _Open, binding: _Binding, plus: torch.Tensor, minus: torch.Tensor | None,
                   eps: float, seed: int) -> None:
        """One kernel launch per parameter of ``binding``: replay the pending updates, write back in place if
        due (float storage; int8 written by part: re-encoded), and fill ``plus``/``minus`` (the part's views,
        from 0) with θ±εz."""
        record = opened.record
        if opened.by_part:
            self._int8_write_pass(record, opened.stored, opened.scales, opened.log, opened.encoded, opened.sr_seed,
                                  span=(binding.lo, binding.lo + binding.numel), plus=plus, minus=minus, eps=eps,
                                  seed=seed)
            return
        in_place = opened.write and opened.encoded is None
        for slot, _ in binding.params:
            o, n = slot.offset, slot.spec.numel
            r = o - binding.lo
            fused.arrive(opened.stored[o : o + n], param_id=slot.spec.param_id, decay=slot.spec.decay,
                         log=opened.log, new_seed=seed, eps=eps, plus=plus[r : r + n],
                         minus=None if minus is None else minus[r : r + n],
                         write_to=opened.stored[o : o + n] if in_place else None, sr_seed=opened.sr_seed,
                         sr_key=record.index, sr_offset=o, kind=self.config.perturbation, scales=opened.scales)

    def _close(self, opened: _Open) -> None:
        """Finish a block's visit: owed in-place writes of parts never run, the write-back, the slot, the
        next prefetch."""
        if self._open is opened:
            self._open = None
        if opened.work is not None:  # the generic path wrote back and released on arrival
            return
        record = opened.record
        if opened.write and (opened.encoded is None or opened.by_part):
            for b in sorted(self._parts_of.get(record.index, set()) - opened.done):
                binding = self.bindings[b]
                self._part_pass(opened, binding, self._scratch[: binding.numel], None, 0.0, 0)
                if opened.sent:
                    self._send_part(opened, b)
        if opened.by_part and opened.sent:  # the int8 scales (and their padding) go down last
            opened.landed = self.tiers.send_range(record, opened.encoded, record.numel, record.stored_bytes)
        fresh = opened.raw if opened.encoded is None else opened.encoded
        landed = None
        if opened.sent:  # sent down part by part: the host copy is whole once the last range lands
            self.tiers.sent(record, len(self.log))
            landed = opened.landed
            if opened.encoded is not None:  # the next encode waits for the D2H reading the buffer
                self._raw_out_busy = landed
        elif opened.write and record.tier == "host" and not opened.written:  # before the release: the D2H
            landed = self.tiers.write_back(record, fresh, n_steps=len(self.log))  # reads fresh until `landed`
            if opened.encoded is not None:
                self._raw_out_busy = landed
        self.tiers.release(opened.staging, after=landed if opened.encoded is None else None)
        if record.index < len(self.table) - 1:
            self.tiers.prefetch_after(record.index)
        if opened.write and record.tier != "host":  # after the prefetch: a disk write may wait for a staging buffer
            self.tiers.write_back(record, fresh, n_steps=len(self.log))

    def _arrive_fused(self, record: BlockRecord, plus: torch.Tensor | None, minus: torch.Tensor | None,
                      eps: float, seed: int, force_write: bool = False) -> None:
        """A whole visit of ``record`` outside the forward: fetch, replay, write back if due (or
        ``force_write``), and fill ``plus``/``minus`` (the whole block's θ±εz; ``plus=None``: not needed)."""
        self._close_open()
        opened = self._begin_block(record, force_write)
        if plus is not None:
            whole = _Binding(record.index, tuple((slot, ()) for slot in record.slots), 0, record.numel)
            self._part_pass(opened, whole, plus, minus, eps, seed)
        elif opened.write and opened.encoded is None:  # the in-place write needs a pass; its θ goes to scratch
            for slot in record.slots:
                one = _Binding(record.index, ((slot, ()),), slot.offset, slot.spec.numel)
                self._part_pass(opened, one, self._scratch[: slot.spec.numel], None, 0.0, 0)
        opened.done = set(self._parts_of.get(record.index, set()))
        self._close(opened)

    def _int8_write_pass(self, record, stored, scales, log, encoded, sr_seed, span=None, plus=None, minus=None,
                         eps: float = 0.0, seed: int = 0) -> None:
        """Replay an int8 block that is written back and re-encode it into ``encoded``, one range of
        :data:`WRITE_BACK_RANGE_NUMEL` elements at a time: the fused kernel replays each range into an fp32
        buffer, then the encoder keeps every group's stored scale that still fits. fp32 room for one range,
        not the block: 16 MiB instead of 2.5 GB at OPT-30B. ``span``: only elements ``[lo, hi)`` of the block
        (a part on group boundaries); with ``plus`` (the part's views, from ``lo``) the same pass builds its
        θ±εz, else they are built afterwards, part by part."""
        if self._range_buf is None:  # a piece may start up to 3 elements before its range (Philox groups of 4)
            self._range_buf = torch.empty(WRITE_BACK_RANGE_NUMEL + 4, dtype=torch.float32, device=self.device)
        start, end = span or (0, record.numel)
        for lo in range(start, end, WRITE_BACK_RANGE_NUMEL):
            hi = min(lo + WRITE_BACK_RANGE_NUMEL, end)
            for slot in record.slots:
                o, n = slot.offset, slot.spec.numel
                a, b = max(lo, o) - o, min(hi, o + n) - o
                if a >= b:
                    continue
                a -= a % 4  # the elements before lo are recomputed to the same values
                first, last = o + a, o + b
                piece = self._range_buf[first - lo + 4 : last - lo + 4]
                # θ goes to the range buffer (write_to); without the part's views, plus (θ itself at eps = 0,
                # no z drawn) is pointed at it too, as the kernel needs somewhere to write
                fused.arrive(stored[first:last], param_id=slot.spec.param_id, decay=slot.spec.decay, log=log,
                             new_seed=seed, eps=eps, write_to=piece, sr_seed=sr_seed, sr_key=record.index,
                             plus=piece if plus is None else plus[first - start : last - start],
                             minus=None if minus is None else minus[first - start : last - start],
                             sr_offset=first, kind=self.config.perturbation, scales=scales, z_offset=a)
            encode_int8_range(self._range_buf[4 : 4 + hi - lo], encoded, record.numel, lo, sr_seed=sr_seed,
                              sr_key=record.index, prev_scales=scales, fused_kernel=FUSED_INT8_ENCODE)

    def _views(self, binding: _Binding, work, scratch, scale: float, seed: int) -> dict[str, torch.Tensor]:
        """The binding's θ + scale·z views: of ``work`` (its record's clean weights) where scale is 0 and the
        dtypes match, else built into ``scratch`` from 0."""
        out = {}
        for slot, local in binding.params:
            n, o = slot.spec.numel, slot.offset
            if scale == 0.0 and work.dtype == self.compute_dtype:
                view = work[o : o + n]
            else:
                r = o - binding.lo
                view = scratch[r : r + n]
                if scale == 0.0:
                    view.copy_(work[o : o + n])
                elif fused.available(self.device, work.dtype):
                    fused.arrive(work[o : o + n], param_id=slot.spec.param_id, decay=False,
                                 log=self._no_log(), new_seed=seed, eps=scale, plus=view,
                                 minus=None, write_to=None, sr_seed=0, sr_key=0, sr_offset=0,
                                 kind=self.config.perturbation)
                else:
                    perturb_into(work[o : o + n], view, step_seed=seed, param_id=slot.spec.param_id,
                                 scale=scale, kind=self.config.perturbation)
            for name in local:
                out[name] = view.view(slot.spec.shape)
        return out

    # ---- arrival: decode, replay, write back ------------------------------------------------------
    def _arrive(self, record: BlockRecord, scratch: torch.Tensor | None) -> torch.Tensor:
        """The block's clean fp32 weights with every logged update applied."""
        if self._is_fused(record):  # the GPU replays with the same kernel the step uses
            if record.tier == "device" and record.storage == "fp32":
                work = record.data.view(torch.float32)
            else:
                work = scratch[: record.numel] if scratch is not None else torch.empty(record.numel, device=self.device)
            self._arrive_fused(record, work, None, 0.0, 0)
            return work
        raw, staging = self.tiers.fetch(record)
        if record.tier == "device" and record.storage == "fp32":
            work = record.data.view(torch.float32)
        else:
            work = scratch[: record.numel] if scratch is not None else torch.empty(record.numel, device=self.device)
            raw = raw.to(self.device)  # blocking from host staging
            decode(raw, record.storage, record.numel, work)
            self._keep_scales(record, raw)
        self.tiers.release(staging)
        if record.index < len(self.table) - 1:
            self.tiers.prefetch_after(record.index)
        pending = len(self.log) - record.applied_steps
        self._replay(record, work)
        if self._write_due(record, pending):
            self._write_back(record, work)
        return work

    def _write_due(self, record: BlockRecord, pending: int) -> bool:
        """Write back on the device always; elsewhere every K steps (block i at steps t with (t + i) % K == 0,
        so the write-backs of a step are spread evenly), or once ``max_log`` updates are pending."""
        if pending <= 0 or record.tier == "device":
            return pending > 0
        if record.tier == "disk" and self._shared_disk:  # all ranks consolidate together (shared_disk.py)
            return False
        k = self.write_back_every[record.tier]
        return pending >= self._log_limit(record.tier) or (len(self.log) + record.index) % k == 0

    def _log_limit(self, tier: str) -> int:
        """Pending updates at which a block of ``tier`` is written back: K, or ``max_log`` if smaller."""
        k = self.write_back_every[tier]
        return k if self.max_log is None else min(k, self.max_log)

    def _keep_scales(self, record: BlockRecord, raw: torch.Tensor) -> None:
        """Remember an int8 block's stored scales so its write-back keeps every group that still fits."""
        if record.storage != "int8":
            return
        scales = int8_scales(raw, record.numel)
        if self._prev_scales is None or self._prev_scales.numel() < scales.numel():
            self._prev_scales = torch.empty(scales.numel(), dtype=torch.float32, device=self.device)
        self._prev_scales[: scales.numel()].copy_(scales)
        self._prev_scales_of = record.index

    def _replay(self, record: BlockRecord, work: torch.Tensor) -> None:
        for entry in self.log[record.applied_steps :]:
            if entry.lr == 0.0:  # θ − 0·(…) is θ: skip the RNG pass
                continue
            for slot in record.slots:
                n, o = slot.spec.numel, slot.offset
                apply_update_(work[o : o + n], step_seed=entry.step_seed, param_id=slot.spec.param_id,
                              lr=entry.lr, projected_grad=entry.projected_grad,
                              weight_decay=entry.weight_decay if slot.spec.decay else 0.0,
                              kind=self.config.perturbation)
        if record.tier == "device" and record.storage == "fp32":
            self.table.mark_applied(record, len(self.log))

    def _write_back(self, record: BlockRecord, work: torch.Tensor) -> None:
        if record.tier == "device" and record.storage == "fp32":  # work is the stored copy itself
            self.table.mark_applied(record, len(self.log))
            return
        raw = self._raw_out(record.stored_bytes)
        prev = None
        if record.storage == "int8" and self._prev_scales_of == record.index:
            prev = self._prev_scales[: int8_scales(raw, record.numel).numel()]
        encode(work, record.storage, raw, sr_seed=step_seed(self.config.seed ^ 0x5A5A5A5A, len(self.log)),
               sr_key=record.index, prev_scales=prev)
        # applied once stored (disk: once written); a host D2H reads raw until the event
        self._raw_out_busy = self.tiers.write_back(record, raw, n_steps=len(self.log))

    # ---- weights out ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def trace(self, path: str | os.PathLike) -> Iterator[Timeline]:
        """Record a per-block timeline of the steps run inside the ``with``; write it to ``path`` (Chrome trace).

        Lanes: compute, H2D / D2H copies (CUDA) and each disk reader / writer thread. Open the file in
        Perfetto or chrome://tracing, or draw it with ``tools/plot_trace.py``. Example::

            with engine.trace("runs/steps.json"):
                for batch in batches[:3]:
                    engine.step(batch)
        """
        self._check_open()
        if self._timeline is not None:
            raise RuntimeError("a trace is already being recorded; traces do not nest")
        timeline = Timeline(self.device)
        self._timeline = self.tiers.timeline = timeline
        if self.tiers._cuda is not None:
            self.tiers._cuda.timeline = timeline
        try:
            yield timeline
            self.tiers.drain()  # the write-backs started inside the trace land in it
        finally:
            self._timeline = self.tiers.timeline = None
            if self.tiers._cuda is not None:
                self.tiers._cuda.timeline = None
        timeline.export(os.fspath(path))

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Current weights on the CPU with every pending update applied; same keys as ``model.state_dict()``."""
        self._check_open()
        self.tiers.drain()
        values: dict[str, torch.Tensor] = {}
        for record in self.table:
            work = self._arrive(record, scratch=torch.empty(record.numel, device=self.device))
            for slot in record.slots:
                t = work[slot.offset : slot.offset + slot.spec.numel].view(slot.spec.shape)
                values[slot.spec.name] = t.to("cpu", self.compute_dtype, copy=True)
        self.tiers.drain()
        out = {}
        for key, ref in self._buffers_by_key.items():
            if ref is None:
                canonical = self.layout.aliases.get(key, key)
                out[key] = values[canonical]
            else:
                module, name = ref
                out[key] = module._buffers[name].to("cpu", copy=True)
        return out

    # ---- life cycle -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every block with pending updates back to its tier (shared_disk: a collective, every rank calls it)."""
        self._check_open()
        self.tiers.drain()  # settle the write-backs in flight first (raises a failed one's error)
        for record in self.table:
            if record.applied_steps < len(self.log) and not (self._shared_disk and record.tier == "disk"):
                if self._is_fused(record):  # the kernel pass writes it back (its θ lands in the scratch)
                    self._arrive_fused(record, None, None, 0.0, 0, force_write=True)
                    continue
                work = self._arrive(record, scratch=self._work)
                if record.applied_steps < len(self.log) and record.write_future is None:
                    self._write_back(record, work)
        self.tiers.drain()
        if self._shared_disk:
            _shared_disk.consolidate(self)

    def close(self) -> None:
        """Write back pending updates and stop the I/O threads. Safe to call twice (shared_disk: a collective).

        If a write-back fails (e.g. the disk is full) the error is raised and the engine stays open with
        its updates pending in the log: free space and call ``close()`` again; nothing is lost.
        """
        if self._closed:
            return
        self.flush()
        _store_glue.close_store(self)  # full write-back into the store, manifest committed, lock released
        self.tiers.close()
        if self.disk_dir is not None and not self._disk_follower:
            release_disk_dir(self.disk_dir)
        self._closed = True

    def __enter__(self) -> "ZOEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ZOEngine is closed; build a new one (or resume from a checkpoint)")

    # ---- front-end seams (logic in zo2tier/generate.py) ---------------------------------------------
    @torch.no_grad()
    def forward(self, **model_kwargs: Any) -> Any:
        """The model's own forward, unperturbed, through the tiers (every update applied); keywords such as
        ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values``, ``use_cache`` pass through."""
        self._check_open()
        rows = model_kwargs["input_ids"]
        self._mode, self._rows, self._flat_rows = ("eval", 0, 0.0), rows.shape[0], rows.numel()
        self._prepare_resident()
        try:
            return self.model(**model_kwargs)
        finally:
            self._close_open()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, temperature: float = 0.0, seed: int = 0, eos_token_id=None,
                 pad_token_id: int | None = None, kv_cache: str = "auto") -> torch.Tensor:
        """New token ids (B, <= max_new_tokens) after left-padded ``input_ids``, KV-cached, through the tiers;
        ``temperature`` 0 is greedy; ``kv_cache``: device, host or auto (zo2tier/generate.py).
        Example: ``engine.generate(ids, mask, max_new_tokens=16)``."""
        from zo2tier.generate import Sampling, generate_ids

        return generate_ids(self, input_ids, attention_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            sampling=Sampling(max_new_tokens, temperature, seed, kv_cache))


_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def _named(binding: _Binding, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The binding's parameters as views of the flat buffer ``flat`` (its span from 0)."""
    out = {}
    for slot, local in binding.params:
        r = slot.offset - binding.lo
        view = flat[r : r + slot.spec.numel].view(slot.spec.shape)
        for name in local:
            out[name] = view
    return out


def run_dual_eval(inner: nn.Module, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    from torch.func import functional_call

    return functional_call(inner, weights, args, kwargs, tie_weights=False, strict=False)


def _unpack(batch: Mapping[str, torch.Tensor], device: torch.device):
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
