"""The engine and its store: build from a store, keep the store in step, save and resume checkpoints.

A store holds every block (``docs/store.md``). Disk-tier blocks live in it directly; device and host
blocks are copied into it once and again only when needed. A block's stored copy says which prefix of the
update log it holds (``applied_steps``); the log tail replays the rest. A checkpoint is that block table,
the log tail, the config and the caller's ``extra_state``: a few KB while the store files are referenced.

Blocks stored in fp32 replay bit-exactly from any older copy, so they are re-persisted only when their
log tail grows past :data:`REPLAY_LIMIT_STEPS`. Narrow copies (bf16/fp16/int8 on device or host) carry
their rounding history and are persisted whenever they changed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from zo2tier.config import MeZOConfig
from zo2tier.model.loading import StateSource, params_on_meta
from zo2tier.store.blockstore import BlockStore
from zo2tier.store.format import BlockEntry, Manifest, TensorEntry, fsync_dir, write_json_atomic
from zo2tier.store.zstd import Zstd
from zo2tier.tiers.codec import decode, dtype_name, encode
from zo2tier.tiers.records import BlockRecord
from zo2tier.zo.update import LogEntry

CHECKPOINT = "checkpoint.json"
CHECKPOINT_FORMAT = "zo2tier-checkpoint"
REPLAY_LIMIT_STEPS = 256
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def folded(step: int) -> LogEntry:
    """A log slot whose update every block already holds; replaying it would poison weights with NaN."""
    return LogEntry(step, 0, math.nan, math.nan, math.nan)


# ---- the model a store describes ----------------------------------------------------------------------
def skeleton_from_config(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """An AutoModelForCausalLM built from a config dict, parameters on meta, buffers real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    if "model_type" not in config:
        raise ValueError("the store's config has no model_type; re-convert the model with `zo2tier convert`")
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **cfg), dtype=dtype)
    model.tie_weights()
    return model.eval()


def block_entry(record: BlockRecord) -> BlockEntry:
    tensors = tuple(TensorEntry(s.spec.name, tuple(s.spec.shape), s.offset, s.spec.numel, s.spec.param_id,
                                s.spec.decay) for s in record.slots)
    return BlockEntry(record.index, record.name, record.storage, record.numel, tensors)


def draft_manifest(config: dict, dtype: torch.dtype, records: list[BlockRecord], perturbation: str) -> Manifest:
    return Manifest(config, dtype_name(dtype), tuple(block_entry(r) for r in records), perturbation=perturbation,
                    complete=False)


class StoreSource(StateSource):
    """Initial weights from an opened store: whole blocks as stored bytes, or one tensor at a time."""

    def __init__(self, model: nn.Module, store: BlockStore, *, in_place: bool = True) -> None:
        super().__init__(model)
        self.store = store
        self.in_place = in_place  # False: the engine leaves the store unchanged (changed blocks go elsewhere)
        m = store.manifest
        self.log = [folded(i) for i in range(m.log_start)] + [LogEntry.from_json(r) for r in m.log]
        self._where = {t.name: (b.index, t) for b in m.blocks for t in b.tensors}
        self._cached: tuple[int, torch.Tensor] | None = None

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(f"store {self.store.path} has no tensor {name!r}; it was converted from another "
                             "model, or under a transformers version that named this model's parameters otherwise "
                             "(convert it again)")
        index, t = self._where[name]
        if self._cached is None or self._cached[0] != index:
            entry = self.store.entry(index)
            flat = decode(self.store.read_bytes(index), entry.dtype, entry.numel, torch.empty(entry.numel))
            self._cached = (index, flat)
        return self._cached[1][t.offset : t.offset + t.numel].view(t.shape)

    def matches(self, record: BlockRecord) -> bool:
        """True if the store holds ``record``'s block in the engine's exact flat layout."""
        entry = self.store.entry(record.index)
        return entry.name == record.name and entry.tensors == block_entry(record).tensors


# ---- building an engine on a store ----------------------------------------------------------------------
def open_engine_store(engine, records: list[BlockRecord], source: StateSource) -> BlockStore | None:
    """The store the engine keeps in step: the source store itself (in place), an overlay of it in the disk
    directory (its changed blocks there, the source unchanged), a new one, or none."""
    if isinstance(source, StoreSource):
        in_place = source.in_place and (engine.disk_dir is None or
                                        os.path.abspath(engine.disk_dir) == source.store.path)
        engine.log = list(source.log)
        pending = len(engine.log) - min(e.applied_steps for e in source.store.entries)
        if pending and engine.config.perturbation != source.store.manifest.perturbation:
            raise ValueError(f"the store has {pending} pending updates made with perturbation="
                             f"{source.store.manifest.perturbation!r}; pass a MeZOConfig with that perturbation")
        if in_place:
            return source.store
        # nothing on disk: every block in memory, the base only read; else an overlay in the disk directory
        return None if engine.disk_dir is None else BlockStore.overlay(source.store, engine.disk_dir)
    if engine.disk_dir is None:
        return None
    config = engine.model.config.to_dict()
    return BlockStore.create(engine.disk_dir, draft_manifest(config, engine.compute_dtype, records,
                                                             engine.config.perturbation))


def place_from_store(engine, record: BlockRecord, source: StateSource) -> bool:
    """Place ``record`` straight from a source store when its layout matches; False to load tensor-wise."""
    if not isinstance(source, StoreSource) or not source.matches(record):
        return False
    store, entry = source.store, source.store.entry(record.index)
    own = engine.store is store or (engine.store is not None and engine.store.base is store)  # in place, overlay
    same_codec = (entry.zstd is None) == (engine.compress is None)
    if own and record.tier == "disk" and entry.dtype == record.storage and same_codec:
        record.path = store.file_path(entry)  # the store file is the disk tier's copy (an overlay's: until written)
    else:
        raw = store.read_bytes(record.index)
        if entry.dtype != record.storage:  # (a codec change alone rewrites the block with put_initial)
            flat = decode(raw, entry.dtype, entry.numel, torch.empty(entry.numel))
            raw = torch.empty(record.stored_bytes, dtype=torch.uint8)
            encode(flat, record.storage, raw, sr_seed=0, sr_key=record.index, stochastic=False)
        engine.tiers.put_initial(record, raw.to(engine.device))
    if own or (engine.store is None and not source.in_place):  # the log tail replays on arrival
        record.applied_steps = entry.applied_steps
    elif entry.applied_steps != len(source.log):
        raise ValueError(f"store {store.path} has updates pending for block {record.name}; build the engine "
                         "in place (disk_dir = the store) or export the store first")
    return True


def place_initial(engine, record: BlockRecord, source: StateSource) -> None:
    """Place ``record`` in its tier: straight from a source store when it matches, else tensor by tensor
    from ``source``, encoded in its stored dtype (and given its first copy in the engine's store)."""
    if place_from_store(engine, record, source):
        return
    flat = torch.empty(record.numel, dtype=torch.float32, device=engine.device)
    for slot in record.slots:
        flat[slot.offset : slot.offset + slot.spec.numel] = source.get(slot.spec.name).reshape(-1)
    raw = torch.empty(record.stored_bytes, dtype=torch.uint8, device=engine.device)
    encode(flat, record.storage, raw, sr_seed=0, sr_key=record.index, stochastic=False)
    engine.tiers.put_initial(record, raw)
    persist_initial(engine, record, raw)


def persist_initial(engine, record: BlockRecord, raw: torch.Tensor) -> None:
    """Give a device/host block built from tensors its first copy in the engine's store."""
    if engine.store is not None and record.tier != "disk":
        engine.store.write_block(record.index, raw.to("cpu").contiguous(), dtype=record.storage, applied_steps=0)


def finish_initial(engine, source: StateSource) -> None:
    """After every block is placed: commit the store, release a source store that is not ours."""
    if isinstance(source, StoreSource) and source.store is not engine.store and (
            engine.store is None or engine.store.base is not source.store):
        source.store.close()
    if engine.store is not None:
        commit_store(engine)


# ---- keeping the store in step --------------------------------------------------------------------------
def persist_blocks(engine, *, full: bool) -> None:
    """Copy device/host blocks into the store where their stored copy cannot be rebuilt from it.

    ``full``: copy every block not already holding the whole log (a full write-back).
    """
    store, step = engine.store, len(engine.log)
    engine.tiers.drain()
    for record in engine.table:
        entry = store.entry(record.index)
        if record.tier == "disk":
            store.set_applied(record.index, record.applied_steps)
            continue
        behind = entry.applied_steps != record.applied_steps
        need = (entry.file is None
                or (behind and (full or record.storage != "fp32"))  # narrow copies carry rounding history
                or (behind and step - entry.applied_steps > REPLAY_LIMIT_STEPS))
        if need:
            raw = record.data[: record.stored_bytes].to("cpu").contiguous()
            store.write_block(record.index, raw, dtype=record.storage, applied_steps=record.applied_steps)


def commit_store(engine, *, pin: bool = False) -> Manifest:
    store = engine.store
    low = min(e.applied_steps for e in store.entries)
    rows = [e.to_json() for e in engine.log[low:]]
    if any(isinstance(r[3], float) and math.isnan(r[3]) for r in rows):
        raise RuntimeError("a block needs log entries that were folded away; this is a bug in zo2tier")
    return store.commit(step=len(engine.log), log=rows, perturbation=engine.config.perturbation, pin=pin)


def close_store(engine) -> None:
    """At close: a full write-back into the store, commit, release it."""
    if engine.store is None:
        return
    persist_blocks(engine, full=True)
    commit_store(engine)
    engine.store.close()


# ---- checkpoints ----------------------------------------------------------------------------------------
def save_checkpoint(engine, path: str | os.PathLike, extra_state: dict | None = None) -> str:
    """Write ``path/checkpoint.json`` (and ``path/store`` if the engine has no store yet); see ZOEngine."""
    try:
        extra_json = json.loads(json.dumps(extra_state if extra_state is not None else {}, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra_state must be a JSON-able dict ({exc}); keep tensors and objects out of it") from None
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    engine.tiers.drain()
    if engine.store is None:  # everything lives in memory: the checkpoint gets a store, written once
        config = engine.model.config.to_dict()
        engine.store = BlockStore.create(os.path.join(path, "store"), draft_manifest(
            config, engine.compute_dtype, list(engine.table), engine.config.perturbation))
    store = engine.store
    persist_blocks(engine, full=False)
    fsync_dir(store.path)
    entries = store.entries
    low = min(e.applied_steps for e in entries)
    # relative where the store lies in the checkpoint's folder or beside it (a fine-tune's OUT/disk next to
    # OUT/checkpoint), so that the folder holding both can move
    beside = not os.path.relpath(store.path, os.path.dirname(path)).startswith(os.pardir)
    doc = {
        "format": CHECKPOINT_FORMAT, "version": 1,
        "store": os.path.relpath(store.path, path) if beside else store.path,
        "step": len(engine.log), "log_start": low, "log": [e.to_json() for e in engine.log[low:]],
        "config": asdict(engine.config), "n_skipped": engine.n_skipped,
        "engine": {"placement": dict(engine.placement), "storage": dict(engine.storage),
                   "write_back_every": engine.write_back_every, "dtype": dtype_name(engine.compute_dtype),
                   "compress": None if engine.compress is None else asdict(engine.compress),
                   "budget": engine.budget.as_dict()},
        "extra_state": extra_json,
        "estimator_state": engine.estimator.state_dict(),
        "blocks": [e.state() for e in entries],
    }
    write_json_atomic(os.path.join(path, CHECKPOINT), doc)
    commit_store(engine, pin=True)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    file = os.path.join(os.fspath(path), CHECKPOINT)
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{file} does not exist; pass a directory written by ZOEngine.save_checkpoint") from None
    if doc.get("format") != CHECKPOINT_FORMAT or doc.get("version") != 1:
        raise ValueError(f"{file} is not a version-1 zo2tier checkpoint")
    return doc


def from_store(cls, path: str | os.PathLike, **kwargs: Any):
    """Open the store at ``path`` and build an engine on it (in place unless ``disk_dir`` says otherwise)."""
    _refuse_shared_disk(kwargs, "from_store")
    disk_dir = kwargs.get("disk_dir")
    in_place = kwargs.pop("in_place", disk_dir is None or os.path.abspath(disk_dir) == os.path.abspath(path))
    # a store left unchanged is locked shared: other fine-tunes may read it at the same time
    store = BlockStore.open(path, verify_reads=kwargs.pop("verify_reads", True), shared=not in_place)
    return _build_on_store(cls, store, kwargs, in_place=in_place)


def checkpoint_store(path: str | os.PathLike, doc: dict) -> str:
    """The store the checkpoint ``doc`` (read from ``path``) names: relative to ``path``, or absolute."""
    return doc["store"] if os.path.isabs(doc["store"]) else os.path.join(os.fspath(path), doc["store"])


def resume(cls, path: str | os.PathLike, **kwargs: Any):
    """Rebuild the engine a checkpoint describes; ``engine.extra_state`` is the dict saved with it."""
    _refuse_shared_disk(kwargs, "resume")
    doc = read_checkpoint(path)
    store = BlockStore.open(checkpoint_store(path, doc), verify_reads=kwargs.pop("verify_reads", True))
    try:
        store.adopt(doc["blocks"])
        store.commit(step=doc["step"], log=doc["log"], perturbation=doc["config"]["perturbation"], pin=True)
    except BaseException:
        store.close()
        raise
    saved = doc["engine"]
    kwargs.setdefault("config", MeZOConfig(**doc["config"]))
    kwargs.setdefault("placement", saved["placement"])
    kwargs.setdefault("storage", saved["storage"])
    kwargs.setdefault("write_back_every", saved["write_back_every"])
    kwargs.setdefault("budget", saved["budget"])
    kwargs.setdefault("dtype", _TORCH[saved["dtype"]])
    kwargs.setdefault("compress", Zstd(**saved["compress"]) if saved.get("compress") else "none")
    engine = _build_on_store(cls, store, kwargs)
    engine.n_skipped = int(doc.get("n_skipped", 0))
    if doc.get("estimator_state"):
        engine.estimator.load_state_dict(doc["estimator_state"])
    engine.extra_state = doc["extra_state"]
    return engine


def _refuse_shared_disk(kwargs: dict, what: str) -> None:
    """Every rank would lock and open the same store; only a freshly built shared disk tier is supported."""
    if getattr(kwargs.get("data_parallel"), "shared_disk", False):
        raise ValueError(f"ZOEngine.{what} with DataParallel(shared_disk=True) is not supported yet: every rank "
                         "would open the same store; build the engine from the model (rank 0 writes the shared "
                         "disk tier) or use DataParallel(shared_disk=False), each rank its own copy")


def _build_on_store(cls, store: BlockStore, kwargs: dict, *, in_place: bool = True):
    try:
        m = store.manifest
        model = skeleton_from_config(m.config, kwargs.pop("dtype", None) or _TORCH[m.dtype])
        layer_dtypes = {b.dtype for b in m.blocks[:-1]}
        # storage / compress not given (absent, None or empty, as zo2tier finetune passes them): the store's own,
        # as zo2tier plan assumes
        if not kwargs.get("storage") and len(layer_dtypes) == 1:
            kwargs["storage"] = {"disk": layer_dtypes.pop()}
        layouts = [b.zstd for b in m.blocks[:-1]]
        if kwargs.get("compress") is None and layouts and all(layouts):  # a store converted with --compress zstd
            kwargs["compress"] = Zstd(layouts[0].level, layouts[0].frame_bytes)
        if kwargs.get("disk_dir") is None and in_place:
            kwargs["disk_dir"] = store.path
        return cls(model, _source=StoreSource(model, store, in_place=in_place), **kwargs)
    except BaseException:
        store.close()
        raise


def is_store(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding a zo2tier store manifest."""
    from zo2tier.store.format import MANIFEST

    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))
