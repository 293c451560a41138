"""Store (or live engine) -> Hugging Face safetensors model, streamed one block at a time.

``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the result. Every pending update is applied
first: an engine's blocks arrive through its own replay; a store's log tail is replayed here with the
same kernel, so both give the same bits as ``ZOEngine.state_dict()``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import torch

from zo2tier.store.blockstore import BlockStore
from zo2tier.tiers.codec import decode
from zo2tier.zo.kernels import apply_update_
from zo2tier.zo.update import LogEntry

_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8"}
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _ShardedWriter:
    """Writes named tensors, in a fixed order declared up front, into safetensors shard files."""

    def __init__(self, out_dir: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out_dir = out_dir
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for spec in specs:
            n = _nbytes(spec[1], spec[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += n
        single = len(shards) == 1
        self._names = ["model.safetensors" if single else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                       for i in range(len(shards))]
        self._plan = shards
        self._where = {s[0]: i for i, shard in enumerate(shards) for s in shard}
        self._order = [s[0] for s in specs]
        self._next = 0
        self._file = None
        self._shard = -1
        self.total_bytes = sum(_nbytes(s[1], s[2]) for s in specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._order[self._next] != name:
            raise RuntimeError(f"export wrote {name!r} out of order (expected {self._order[self._next]!r})")
        self._next += 1
        shard = self._where[name]
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().contiguous().cpu()
        self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else b"")

    def _open(self, shard: int) -> None:
        self.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self._plan[shard]:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)
        self._file = open(os.path.join(self.out_dir, self._names[shard]), "wb")  # noqa: SIM115 - kept open across calls, closed by close()
        self._file.write(struct.pack("<Q", len(body)) + body)
        self._shard = shard

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"export stopped after {self._next} of {len(self._order)} tensors")
        self.close()
        # the index even for one shard: readers that only look for the index (and tools that list the
        # shards) find it
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {n: self._names[i] for n, i in self._where.items()}}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _write_config(out_dir: str, config: dict, dtype: torch.dtype) -> None:
    from zo2tier.model_ref import with_architectures

    cfg = with_architectures({k: v for k, v in config.items() if k != "quantization_config"})
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def _export(out_dir, config, dtype, specs, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes) -> str:
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    if any(f.endswith(".safetensors") for f in os.listdir(out_dir)):
        raise ValueError(f"{out_dir!r} already holds a safetensors model; export into an empty directory")
    writer = _ShardedWriter(out_dir, specs, max_shard_bytes)
    try:
        for name, t in tensors:
            writer.write(name, t)
        writer.finish()
    finally:
        writer.close()
    _write_config(out_dir, config, dtype)
    return out_dir


def export_engine(engine, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 << 30) -> str:
    """ZOEngine.export: weights as ``engine.state_dict()`` gives them, tied copies saved once."""
    engine.tiers.drain()
    dtype = engine.compute_dtype
    buffers = {k: ref for k, ref in engine.buffer_keys.items() if ref is not None}
    specs = [(s.spec.name, tuple(s.spec.shape), dtype) for r in engine.table for s in r.slots]
    specs += [(k, tuple(getattr(m, n).shape), getattr(m, n).dtype) for k, (m, n) in buffers.items()]

    def tensors():
        for record in engine.table:
            work = engine.materialize(record)
            for slot in record.slots:
                flat = work[slot.offset : slot.offset + slot.spec.numel]
                yield slot.spec.name, flat.view(slot.spec.shape).to("cpu", dtype)
        engine.tiers.drain()
        for key, (module, name) in buffers.items():
            yield key, getattr(module, name)

    return _export(out_dir, engine.model.config.to_dict(), dtype, specs, tensors(), max_shard_bytes)


def export_store(store: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 << 30) -> str:
    """Write the model in ``store`` (every pending update applied) as a Hugging Face safetensors model, with
    the store's tokenizer, generation config and chat template (``STORE/hf``, see zo2tier.model_ref).

    Example::

        zo2tier.export_store("stores/opt-1.3b", "exports/opt-1.3b-tuned")
        model = AutoModelForCausalLM.from_pretrained("exports/opt-1.3b-tuned")
    """
    from zo2tier.checkpoint import skeleton_from_config

    with BlockStore.open(store) as bs:
        m = bs.manifest
        dtype = _TORCH[m.dtype]
        model = skeleton_from_config(m.config, dtype)
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        buffers = {k: v for k, v in model.state_dict().items() if k not in params}
        specs = [(t.name, t.shape, dtype) for b in m.blocks for t in b.tensors]
        specs += [(k, tuple(v.shape), v.dtype) for k, v in buffers.items()]
        log = [LogEntry.from_json(r) for r in m.log]

        def tensors():
            for entry in bs.entries:
                flat = decode(bs.read_bytes(entry.index), entry.dtype, entry.numel, torch.empty(entry.numel))
                for row in log[entry.applied_steps - m.log_start :]:
                    if row.lr == 0.0:
                        continue
                    for t in entry.tensors:
                        apply_update_(flat[t.offset : t.offset + t.numel], step_seed=row.step_seed,
                                      param_id=t.param_id, lr=row.lr, projected_grad=row.projected_grad,
                                      weight_decay=row.weight_decay if t.decay else 0.0, kind=m.perturbation)
                for t in entry.tensors:
                    yield t.name, flat[t.offset : t.offset + t.numel].view(t.shape).to(dtype)
            yield from buffers.items()

        out = _export(out_dir, m.config, dtype, specs, tensors(), max_shard_bytes)
    from zo2tier.model_ref import copy_tokenizer_files, model_ref

    copy_tokenizer_files(model_ref(store), out)
    return out


def engine_state_dict(engine) -> dict[str, torch.Tensor]:
    """ZOEngine.state_dict: every weight on the CPU with every pending update applied, tied names included,
    and the persistent buffers; the whole model in host RAM (``export_engine`` streams instead)."""
    engine.tiers.drain()
    values: dict[str, torch.Tensor] = {}
    for record in engine.table:
        work = engine.materialize(record)
        for slot in record.slots:
            t = work[slot.offset : slot.offset + slot.spec.numel].view(slot.spec.shape)
            values[slot.spec.name] = t.to("cpu", engine.compute_dtype, copy=True)
    engine.tiers.drain()
    out = {}
    for key, ref in engine.buffer_keys.items():
        if ref is None:
            out[key] = values[engine.layout.aliases.get(key, key)]
        else:
            out[key] = getattr(ref[0], ref[1]).to("cpu", copy=True)
    return out
