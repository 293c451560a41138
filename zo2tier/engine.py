"""The tiered MeZO engine: the facade over the pipeline (docs/architecture.md).

One step: the estimator names the copies of the batch to run → the runner streams every block through
them (fetch, replay pending updates, write back when due, θ±εz per copy) → the collective reduces each
copy's loss → the estimator turns the losses into log entries → the entries are appended to the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zo2tier import checkpoint as store_glue
from zo2tier import shared_disk
from zo2tier.batch import check_lr, unpack
from zo2tier.budget import BudgetLike, TierBudget
from zo2tier.collective import Local
from zo2tier.config import MeZOConfig
from zo2tier.distributed import DataParallel, attach
from zo2tier.dtypes import dtype_name
from zo2tier.model.blocks import describe
from zo2tier.model.loading import StateSource, in_memory_source, pretrained_skeleton
from zo2tier.plan import DEFAULT_HOST_LOOKAHEAD, Plan
from zo2tier.planning import make_plan
from zo2tier.store.zstd import Zstd, parse_compress
from zo2tier.tiers.codec import check_storage
from zo2tier.tiers.manager import TierManager
from zo2tier.tiers.records import BlockRecord, BlockTable, block_records
from zo2tier.tiers.write_back import check_max_log, resolve_write_back
from zo2tier.trace import Timeline, record_trace
from zo2tier.visit.bindings import bind_model, release_weights
from zo2tier.visit.runner import BlockRunner, Copies, Schedule
from zo2tier.zo import fused
from zo2tier.zo.estimators import ESTIMATORS, Estimator, make_estimator
from zo2tier.zo.rng import step_seed
from zo2tier.zo.update import LogEntry, causal_lm_loss, inverse_entries

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

RESIDENT = "<resident>"
DISK_LOOKAHEAD = 2  # disk reads in flight by default (lookahead_blocks=None)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one step measured: the reported losses (MeZO: L(θ+εz), L(θ−εz)) and the mean projected gradient."""

    step: int
    loss_plus: float
    loss_minus: float
    projected_grad: float
    skipped: bool = False  # a non-finite loss: no update was logged
    n_skipped: int = 0  # skipped steps so far in this engine


class ZOEngine:
    """Tiered zeroth-order fine-tuning over device / host / disk for any Hugging Face decoder-only causal LM.

    Example::

        engine = ZOEngine(model, budget={"device": "8GiB", "host": "16GiB", "disk": "100GiB"},
                          disk_dir="runs/disk", device="cuda:0", config=MeZOConfig(lr=1e-6))
        r = engine.step({"input_ids": ids, "attention_mask": mask, "labels": ids})
        engine.close()

    ``lookahead_blocks``: blocks fetched ahead of the one computing. The disk tier keeps that many reads in
    flight (default 2). On CUDA, host-tier blocks are uploaded into ``lookahead_blocks + 1`` device slots
    (default 2 slots: the host tier is bound by the bus, and a third measured no faster; docs/io.md).
    ``write_back_every``: K per tier (default: measured per device and storage, docs/io.md); ``max_log``:
    write a block back once this many updates are pending. ``compress``: zstd frames on the disk tier.
    ``data_parallel``: None = over WORLD iff torch.distributed runs > 1 rank; False = never.
    """

    def __init__(self, model: nn.Module, *, budget: BudgetLike, disk_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", config: MeZOConfig | None = None,
                 placement: Mapping[str, str] | None = None, storage: Mapping[str, str] | None = None,
                 write_back_every: int | Mapping[str, int] | None = None, max_log: int | None = None,
                 compress: str | Zstd | Mapping[str, str | Zstd | None] | None = None,
                 lookahead_blocks: int | None = None, data_parallel: DataParallel | bool | None = None,
                 _source: StateSource | None = None) -> None:
        config = config or MeZOConfig()
        if not isinstance(config, MeZOConfig):
            raise ValueError(f"config must be a MeZOConfig, got {type(config).__name__}")
        self.device = torch.device(device)
        self.budget = TierBudget.parse(budget)
        self.layout = describe(model)
        self.compute_dtype = self.layout.params[0].dtype
        default = dtype_name(self.compute_dtype)
        unknown = set(storage or {}) - {"device", "host", "disk"}
        if unknown:
            raise ValueError(f"storage names unknown tier(s) {sorted(unknown)}; use device, host, disk")
        self.storage = {t: check_storage((storage or {}).get(t, default)) for t in ("device", "host", "disk")}
        self.write_back_every = resolve_write_back(write_back_every, self.device, self.storage)
        self.max_log = check_max_log(max_log)
        self.compress = parse_compress(compress)
        self.host_lookahead = DEFAULT_HOST_LOOKAHEAD if lookahead_blocks is None else max(0, lookahead_blocks)
        self.plan = self._make_plan(placement, model)
        self.blocks: list[str] = list(self.layout.block_names)
        self.placement: dict[str, str] = dict(self.plan.placement)
        self.collective = attach(data_parallel) or Local()
        self.estimator: Estimator = self._make_estimator(config)
        self.config = replace(config, n_perturbations=self.estimator.n_perturbations)
        needs_disk = "disk" in self.placement.values()
        if not isinstance(self.collective, Local):  # each rank its own disk_dir/rank{r}, or one shared disk_dir
            disk_dir = self.collective.rank_dir(disk_dir)
        if needs_disk and disk_dir is None:
            raise ValueError("some blocks are placed on disk but disk_dir is None; pass disk_dir='runs/disk'")
        self.disk_policy = shared_disk.policy_for(self.collective, needs_disk, self.compress)
        self.disk_dir = None if not needs_disk else self.disk_policy.claim(os.fspath(disk_dir))
        self.model = model.eval()  # dropout would give the perturbed copies different masks
        self.log: list[LogEntry] = []
        self.n_skipped = 0
        self.extra_state: dict = {}  # the caller's dict from save_checkpoint, given back by resume
        self.store = self.tiers = None
        self._closed = False
        try:
            with self.disk_policy.building(self):
                self._build(model, _source or in_memory_source(model), lookahead_blocks)
        except BaseException:  # e.g. the disk filled while the store was written: let other processes in
            if self.store is not None:
                self.store.close()
            if self.tiers is not None:
                self.tiers.close()
            if self.disk_dir is not None:
                self.disk_policy.release(self.disk_dir)
            raise

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> ZOEngine:
        """Build the skeleton on the meta device and stream each block from the checkpoint into its tier.

        The whole model never sits in host RAM: at most one block's tensors are in memory at a time. ``path``:
        a Hugging Face folder or a zo2tier store. Same keywords as :class:`ZOEngine`, plus ``dtype``.
        """
        if store_glue.is_store(path):
            return cls.from_store(path, **kwargs)
        model, source = pretrained_skeleton(os.fspath(path), dtype=kwargs.pop("dtype", None))
        return cls(model, _source=source, **kwargs)

    @classmethod
    def from_store(cls, path: str | os.PathLike, **kwargs: Any) -> ZOEngine:
        """Build an engine on a zo2tier store (``zo2tier convert`` output, or an engine's ``disk_dir``).

        Example::

            engine = ZOEngine.from_store("stores/opt-1.3b", budget="device=4GiB,host=8GiB,disk=100GiB")
        """
        return store_glue.from_store(cls, path, **kwargs)

    @classmethod
    def resume(cls, path: str | os.PathLike, **kwargs: Any) -> ZOEngine:
        """Continue exactly where :meth:`save_checkpoint` left off; ``engine.extra_state`` is the saved dict.

        Example::

            engine = ZOEngine.resume("runs/ckpt")
        """
        return store_glue.resume(cls, path, **kwargs)

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict | None = None) -> str:
        """Make the run durable: commit the store and write ``path/checkpoint.json``; returns ``path``."""
        self._check_open()
        if self.disk_policy.follower:
            raise ValueError("with DataParallel(shared_disk=True) only rank 0 of the group owns the store and saves "
                             "checkpoints (every rank holds the same weights); call save_checkpoint on rank 0 only")
        return store_glue.save_checkpoint(self, path, extra_state)

    def export(self, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 << 30) -> str:
        """Write the current weights as a Hugging Face safetensors model, streamed one block at a time."""
        from zo2tier.store.export import export_engine

        self._check_open()
        return export_engine(self, out_dir, max_shard_bytes=max_shard_bytes)

    @staticmethod
    def block_names(model: nn.Module) -> list[str]:
        """The movable blocks of ``model`` in execution order, without building an engine."""
        return list(describe(model).block_names)

    def _make_plan(self, placement: Mapping[str, str] | None, model: nn.Module) -> Plan:
        # what the planner saw: zo2tier.predict.predict_step(engine.plan_input, engine.plan, ...)
        self.plan_input, plan = make_plan(
            self.layout, self.budget, placement=placement, compute_dtype=self.compute_dtype, storage=self.storage,
            lookahead_blocks=self.host_lookahead, fused=fused.available(self.device, self.compute_dtype),
            vocab_size=int(getattr(model.config, "vocab_size", 0) or 0), device_type=self.device.type)
        return plan

    def _make_estimator(self, config: MeZOConfig) -> Estimator:
        """The estimator; with ``n_perturbations="auto"`` its smallest q until the first step's batch shape
        lets :meth:`_choose_perturbations` pick."""
        q = config.n_perturbations
        auto = q == "auto"
        self.auto_perturbations: Any = None if auto else False  # the choice, once made
        if auto:
            q = ESTIMATORS[config.estimator].min_perturbations
        return make_estimator(config.estimator, self.collective.perturbations(q, auto=auto))

    def _choose_perturbations(self, shape: tuple[int, int]) -> None:
        """q = "auto": the largest q whose compute hides under the plan's transfers, never below the
        estimator's steady q unless memory forces it (zo2tier.predict.choose_perturbations)."""
        from zo2tier.predict import Calibration, choose_perturbations

        tier = "disk" if "disk" in self.placement.values() else "host"
        choice = choose_perturbations(self.plan_input, self.plan, Calibration(), batch=shape[0], seq=shape[1],
                                      estimator=self.config.estimator, write_back_every=self.write_back_every[tier],
                                      compress=self.compress is not None)
        self.auto_perturbations = choice
        self.estimator = make_estimator(self.config.estimator,
                                        self.collective.perturbations(choice.n_perturbations, auto=True))
        self.config = replace(self.config, n_perturbations=self.estimator.n_perturbations)
        self.runner.schedule = replace(self.runner.schedule, per_step=self.estimator.n_perturbations)
        _log.info("n_perturbations='auto' chose q=%d (%s)", self.estimator.n_perturbations, choice)

    def _build(self, model: nn.Module, source: StateSource, lookahead: int | None) -> None:
        records = block_records(self.layout, self.placement, self.storage, RESIDENT)
        self.table = BlockTable(records)
        self.tiers = TierManager(self.table, device=self.device, disk_dir=self.disk_dir,
                                 lookahead_blocks=DISK_LOOKAHEAD if lookahead is None else lookahead,
                                 upload_slots=self.host_lookahead + 1, compress=self.compress)
        self.store = None if self.disk_policy.follower else store_glue.open_engine_store(self, records, source)
        self.tiers.store = self.store
        self.tiers.open()
        for record in records:  # one block at a time: load, encode, place
            if not (self.disk_policy.follower and record.tier == "disk"):
                store_glue.place_initial(self, record, source)
        self.tiers.drain()
        self.disk_policy.built(self)
        store_glue.finish_initial(self, source)
        modules = list(model.modules())  # before the proxies hide the modules they replace
        schedule = Schedule(self.write_back_every, self.max_log, self.estimator.n_perturbations,
                            keep_disk=self.disk_policy.keep_disk)
        self.runner = BlockRunner(self.table, self.tiers, self.log, seed=self.config.seed,
                                  perturbation=self.config.perturbation, schedule=schedule,
                                  compute_dtype=self.compute_dtype,
                                  bind=lambda run: bind_model(model, self.layout, records, run, self.device))
        release_weights(modules, self.device)
        self.buffer_keys = source.buffer_keys()

    # ---- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: Mapping[str, torch.Tensor], *, lr: float | None = None,
             loss_fn: Callable[[torch.Tensor, Mapping[str, Any]], float] | None = None) -> StepResult:
        """One step on ``batch`` (``input_ids``, optional ``attention_mask`` and ``labels``).

        ``loss_fn(logits, batch) -> float``, if given, replaces the causal-LM loss: it is called once per
        copy with that copy's logits (B, T, V) and ``batch`` as passed in. Data-parallel engines take the
        global batch and run their shard (zo2tier/distributed.py).
        """
        self._check_open()
        check_lr(lr)
        self.disk_policy.before_step(self)
        self.collective.before_step(self)
        local = self.collective.shard(batch)
        ids, mask, labels = unpack(local, self.device)
        if self.auto_perturbations is None:
            self._choose_perturbations((self.collective.widest_shard(ids.shape[0]), ids.shape[1]))
        cfg, start = self.config, len(self.log)
        seeds = [step_seed(cfg.seed, start + k) for k in range(self.estimator.n_perturbations)]
        groups = self.estimator.groups()
        ran = self.collective.copies_to_run(groups)
        copies = tuple((0, 0.0) if groups[i].k is None else (seeds[groups[i].k], groups[i].sign * cfg.eps) for i in ran)
        logits = self._forward(copies, ids, mask)
        step_lr = cfg.lr if lr is None else lr
        n = ids.shape[0]
        losses = self.collective.losses([logits[j * n : (j + 1) * n] for j in range(len(ran))], labels, ran,
                                        len(groups), loss_fn=loss_fn, batch=local,
                                        header=(step_lr, start, step_seed(cfg.seed, start)), device=self.device)
        del logits
        est = self.estimator.estimate(losses, start=start, seeds=seeds, eps=cfg.eps, lr=step_lr,
                                      weight_decay=cfg.weight_decay)
        if est.skipped:  # logged with lr 0: it never reaches the weights
            self.n_skipped += 1
            _log.warning("step %d skipped: non-finite loss (loss+ %s, loss- %s); %d step(s) skipped so far",
                         start, est.loss_plus, est.loss_minus, self.n_skipped)
        self.log.extend(est.entries)
        return StepResult(start, est.loss_plus, est.loss_minus, est.projected_grad, est.skipped, self.n_skipped)

    def extend_log(self, entries: Sequence[LogEntry]) -> None:
        """Append updates another run logged on the same base weights (its ``log``, or a saved copy:
        ``LogEntry.from_json``); each block replays them at its next visit, as it does deferred write-backs.

        A fresh engine on the base plus a run's log is that run: the weights bit for bit where the stored
        dtype is the compute dtype, and its next steps too (the seeds follow the log's length). So a log of a
        few KB carries a fine-tune between machines. The entries must continue this log (entry i is step
        ``len(log) + i``) and be finite (not the slots a resumed checkpoint folded). Data parallel: a
        collective, every rank passes the same entries.
        """
        self._check_open()
        start = len(self.log)
        for i, e in enumerate(entries):
            if e.step != start + i:
                raise ValueError(f"entry {i} is step {e.step}, but it would be step {start + i} of this log; pass a "
                                 "run's entries in order, starting at this engine's log length")
            if not e.replayable:
                raise ValueError(f"entry {i} (step {e.step}) is not finite: a slot folded by a checkpoint resume, "
                                 "which only its own store can replay")
        self.log.extend(entries)

    def revert_to(self, n_entries: int) -> int:
        """Undo every update after the first ``n_entries`` of the log; returns how many entries that appended.

        The log is the model, so an undo is more log: the inverse of each later entry, newest first
        (:func:`zo2tier.zo.update.inverse_entries`). Every tier replays them like any step, so tiers still agree
        bit for bit, and the weights come back to those after entry ``n_entries`` up to fp32 rounding. A
        fine-tune keeps its best dev evaluation this way (``zo2tier finetune --keep best``). The next step's
        seeds follow the longer log. Data parallel: a collective, every rank calls it with the same value.
        """
        self._check_open()
        if isinstance(n_entries, bool) or not isinstance(n_entries, int) or not 0 <= n_entries <= len(self.log):
            raise ValueError(f"n_entries={n_entries!r} must be an int in [0, {len(self.log)}] (the log's length)")
        undo = inverse_entries(self.log[n_entries:], len(self.log))
        self.log.extend(undo)
        return len(undo)

    def _forward(self, copies: tuple[tuple[int, float], ...], ids: torch.Tensor, mask: torch.Tensor | None,
                 **model_kwargs: Any) -> torch.Tensor:
        g = len(copies)
        self.runner.begin(self._copies(copies, ids))
        if g > 1:
            ids, mask = torch.cat([ids] * g), None if mask is None else torch.cat([mask] * g)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **model_kwargs).logits
        self.runner.end()
        return logits

    def _copies(self, copies: tuple[tuple[int, float], ...], ids: torch.Tensor) -> Copies:
        """The copies of ``ids`` (B, T) a forward runs, with the dim-0 sizes a layer may see them in: G*B, its
        tokens flattened (G*B*T), its attention heads flattened (G*B*H, BLOOM's ALiBi bias); and H, which a
        tensor without a batch may have as dim 0 (MPT's ALiBi bias)."""
        g, heads = len(copies), getattr(self.model.config, "num_attention_heads", 0)
        heads = heads if isinstance(heads, int) else 0  # per-layer head counts (a list): no such rows
        return Copies(copies, g * ids.shape[0], (g * ids.numel(), g * ids.shape[0] * heads), heads)

    @torch.no_grad()
    def evaluate(self, batch: Mapping[str, torch.Tensor]) -> float:
        """Unperturbed loss on ``batch``, through the same tiers, with every update applied."""
        return causal_lm_loss(self.logits(batch), unpack(batch, self.device)[2])

    @torch.no_grad()
    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unperturbed logits (B, T, V) on ``batch``, with every update applied."""
        self._check_open()
        ids, mask, _ = unpack(batch, self.device)
        return self._forward(((0, 0.0),), ids, mask)

    @torch.no_grad()
    def forward(self, **model_kwargs: Any) -> Any:
        """The model's own unperturbed forward through the tiers (``input_ids`` required; ``past_key_values``,
        ``use_cache``, ``position_ids``... pass through). Returns the model's output; generation uses it."""
        self._check_open()
        self.runner.begin(self._copies(((0, 0.0),), model_kwargs["input_ids"]))
        try:
            return self.model(**model_kwargs)
        finally:
            self.runner.end()

    # ---- weights out ------------------------------------------------------------------------------
    def materialize(self, record: BlockRecord) -> torch.Tensor:
        """``record``'s clean fp32 weights (every logged update applied) in a fresh buffer on the device."""
        self._check_open()
        return self.runner.materialize(record, scratch=torch.empty(record.numel, device=self.device))

    @property
    def timeline(self) -> Timeline | None:
        """The timeline :meth:`trace` records into, while it records."""
        return self.runner.timeline

    def trace(self, path: str | os.PathLike) -> contextlib.AbstractContextManager[Timeline]:
        """Record a per-block timeline of the steps run inside the ``with``; write it to ``path`` (Chrome trace:
        Perfetto, chrome://tracing or tools/plot_trace.py). Example::

            with engine.trace("runs/steps.json"):
                engine.step(batch)
        """
        self._check_open()
        return record_trace(self, path)

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Current weights on the CPU with every pending update applied; same keys as ``model.state_dict()``.
        Holds the whole model in host RAM: :meth:`export` streams instead."""
        self._check_open()
        from zo2tier.store.export import engine_state_dict

        return engine_state_dict(self)

    # ---- life cycle -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every block with pending updates back to its tier (shared_disk: a collective, every rank calls it)."""
        self._check_open()
        self.runner.flush()
        self.disk_policy.flushed(self)

    def close(self) -> None:
        """Write back pending updates and stop the I/O threads. Safe to call twice (shared_disk: a collective).

        If a write-back fails (e.g. the disk is full) the error is raised and the engine stays open with
        its updates pending in the log: free space and call ``close()`` again; nothing is lost.
        """
        if self._closed:
            return
        self.flush()
        store_glue.close_store(self)  # full write-back into the store, manifest committed, lock released
        self.tiers.close()
        if self.disk_dir is not None:
            self.disk_policy.release(self.disk_dir)
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ZOEngine is closed; build a new one (or resume from a checkpoint)")

    # ---- generation (logic in zo2tier/generate.py) -------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, temperature: float = 0.0, seed: int = 0, eos_token_id=None,
                 pad_token_id: int | None = None, kv_cache: str = "auto") -> torch.Tensor:
        """New token ids (B, <= max_new_tokens) after left-padded ``input_ids``, KV-cached, through the tiers;
        ``temperature`` 0 is greedy; ``kv_cache``: device, host or auto (zo2tier/generate.py).
        Example: ``engine.generate(ids, mask, max_new_tokens=16)``."""
        from zo2tier.generate import Sampling, generate_ids

        return generate_ids(self, input_ids, attention_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            sampling=Sampling(max_new_tokens, temperature, seed, kv_cache))
