"""``zo2tier convert``: a Hugging Face checkpoint (or a bare config) -> a zo2tier store, streamed.

One tensor at a time, in chunks: peak RSS stays near one chunk plus the interpreter, whatever the model
size (for a GGUF, near its largest tensor in fp32: each is dequantized whole, on its own). Blocks are laid out exactly as the engine lays
them out, so the engine reads the store in place. A re-run with the same source and options skips blocks
already written with a good checksum, so an interrupted convert resumes and a finished one is a no-op.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from zo2tier.model.blocks import describe
from zo2tier.model_ref import HF_FILES_DIR, model_ref, with_architectures, write_model_files
from zo2tier.store.blockstore import BlockStore, StoreCorruptError
from zo2tier.store.format import MANIFEST, BlockEntry, Manifest, StoreFormatError, TensorEntry, read_manifest
from zo2tier.store.sources import (
    DictSource,
    GGUFSource,
    RandomSource,
    SafetensorsSource,
    TensorSource,
    safetensors_files,
)
from zo2tier.store.zstd import Zstd, parse_compress
from zo2tier.tiers.codec import INT8_GROUP, check_storage, dtype_name, encode

RESIDENT = "<resident>"
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ConvertReport:
    """What a convert did."""

    store: str
    n_blocks: int
    n_written: int  # blocks written by this run (the others were already good)
    source_bytes: int
    store_bytes: int  # compressed bytes for zstd blocks
    seconds: float


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
            disk_dtype: str | None = None, progress: bool = True, chunk_bytes: int = 32 << 20,
            seed: int = 0, compress: str | Zstd | None = None) -> ConvertReport:
    """Stream ``src`` into a store at ``dst``.

    ``src``: a Hugging Face model directory (safetensors, sharded or not; ``pytorch_model.bin``; a ``.gguf``
    file, streamed tensor by tensor) or a ``config.json`` (random init of that shape). ``dtype``: the
    model's compute dtype (default: the source's, so a plain convert is lossless). ``disk_dtype``: how the
    decoder-layer blocks are stored (default ``dtype``; ``int8`` quantizes them); the resident set
    (embeddings, final norm, head) is stored in ``dtype``. ``compress="zstd"`` (or a ``Zstd``) stores the
    decoder-layer blocks as zstd frames, as an engine with ``compress="zstd"`` keeps its disk tier; the
    resident set is never compressed (it lives on the compute device).

    Example::

        zo2tier.convert("hf/opt-1.3b", "stores/opt-1.3b", disk_dtype="bf16", compress="zstd")
    """
    import time

    t0 = time.perf_counter()
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    for name, value in (("dtype", dtype), ("disk_dtype", disk_dtype)):
        if value is not None and (value not in _TORCH and not (name == "disk_dtype" and value == "int8")):
            raise ValueError(f"{name}={value!r} is unknown; use fp32, bf16, fp16" + (" or int8" if name == "disk_dtype" else ""))
    spec = parse_compress(compress)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"DST {dst!r} is a file; give a new or empty directory for the store")
    config, source, src_dtype = _open_source(src, seed)
    config = with_architectures(config)
    try:
        compute = _TORCH[dtype] if dtype else src_dtype
        layer_dtype = check_storage(disk_dtype or dtype_name(compute))
        from zo2tier.checkpoint import skeleton_from_config

        model = skeleton_from_config(config, compute)
        if isinstance(source, RandomSource):
            source = RandomSource(config, compute, seed, {p.name: p.decay for p in describe(model).params})
        entries = block_layout(model, layer_dtype, dtype_name(compute))
        src_info = {"src": src, **source.fingerprint(), "dtype": dtype_name(compute), "disk_dtype": layer_dtype}
        if spec is not None:  # only then: stores converted before v2 keep their source record
            src_info["compress"] = {"zstd": {"level": spec.level, "frame_bytes": spec.frame_bytes}}
        draft = Manifest(config, dtype_name(compute), tuple(entries), complete=False, source=src_info)
        store, done = _open_dst(dst, draft)
        try:
            report = _run(store, source, done, chunk_bytes, progress, t0, spec)
        finally:
            store.close()
        # the rest of a complete model: tokenizer, generation config, chat template, config.json
        write_model_files(model_ref(src), os.path.join(dst, HF_FILES_DIR), config=config)
        return report
    finally:
        source.close()


def _run(store: BlockStore, source: TensorSource, done: set[int], chunk_bytes: int, progress: bool,
         t0: float, compress: Zstd | None) -> ConvertReport:
    import time

    from tqdm import tqdm

    entries = store.entries
    sizes = [sum(t.numel * source.dtype_of(t.name).itemsize for t in e.tensors) for e in entries]
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1000, disable=not progress,
               desc=f"convert -> {os.path.basename(store.path)}", dynamic_ncols=True)
    written = 0
    try:
        for entry, size in zip(entries, sizes):
            if entry.index in done:
                bar.update(size)
                continue
            store.write_block_stream(entry.index, _encoded(entry, source, chunk_bytes, bar), dtype=entry.dtype,
                                     compress=None if entry.name == RESIDENT else compress)
            store.commit(complete=False)  # progress survives a crash: a re-run skips this block
            written += 1
        bar.set_description("verify checksums")
        store.verify()
        store.commit(complete=True)
    finally:
        bar.close()
    stored = sum(e.zstd.stored_bytes if e.zstd is not None else e.nbytes for e in store.entries)
    return ConvertReport(store.path, len(entries), written, sum(sizes), stored,
                         time.perf_counter() - t0)


def _encoded(entry: BlockEntry, source: TensorSource, chunk_bytes: int, bar) -> Iterator[memoryview]:
    """The block's stored bytes, in file order, from fp32 chunks of its tensors (RTN, as the engine)."""
    chunk_numel = max(INT8_GROUP, chunk_bytes // 4 // INT8_GROUP * INT8_GROUP)
    carry = torch.empty(0)
    scales: list[torch.Tensor] = []
    for t in entry.tensors:
        item = source.dtype_of(t.name).itemsize
        for chunk in source.chunks(t.name, t.numel, chunk_numel):
            bar.update(chunk.numel() * item)
            if entry.dtype != "int8":
                raw = torch.empty(chunk.numel() * _TORCH[entry.dtype].itemsize, dtype=torch.uint8)
                encode(chunk, entry.dtype, raw, sr_seed=0, sr_key=0, stochastic=False)
                yield memoryview(raw.numpy())
                continue
            if carry.numel():
                chunk = torch.cat([carry, chunk])
            body = chunk.numel() // INT8_GROUP * INT8_GROUP
            carry = chunk[body:].clone()
            if body:
                yield _int8_piece(chunk[:body], scales)
    if entry.dtype == "int8":
        if carry.numel():
            yield _int8_piece(carry, scales)
        yield memoryview(bytes((-entry.numel) % 4))  # the padding before the fp32 scales
        yield memoryview(torch.cat(scales).numpy()).cast("B") if scales else memoryview(b"")


def _int8_piece(values: torch.Tensor, scales: list[torch.Tensor]) -> memoryview:
    """Encode a group-aligned run of values; keep its scales for the end of the block."""
    n = values.numel()
    raw = torch.empty(n + (-n) % 4 + 4 * (-(-n // INT8_GROUP)), dtype=torch.uint8)
    encode(values, "int8", raw, sr_seed=0, sr_key=0, stochastic=False)
    start = n + (-n) % 4
    scales.append(raw[start:].view(torch.float32).clone())
    return memoryview(raw[:n].numpy())


def block_layout(model, layer_dtype: str, resident_dtype: str) -> list[BlockEntry]:
    """The store's block entries for ``model`` (a skeleton on meta is enough), laid out as the engine lays
    out its blocks: each decoder layer in ``layer_dtype``, then the resident set in ``resident_dtype``,
    parameters back to back. Tools that write a store block by block (e.g. random weights made on a GPU)
    start from these."""
    layout = describe(model)
    groups = [(name, layout.params_under(name)) for name in layout.block_names]
    in_blocks = {p.param_id for _, ps in groups for p in ps}
    groups.append((RESIDENT, [p for p in layout.params if p.param_id not in in_blocks]))
    entries = []
    for i, (name, params) in enumerate(groups):
        tensors, offset = [], 0
        for p in params:
            tensors.append(TensorEntry(p.name, tuple(p.shape), offset, p.numel, p.param_id, p.decay))
            offset += p.numel
        entries.append(BlockEntry(i, name, resident_dtype if name == RESIDENT else layer_dtype, offset, tuple(tensors)))
    return entries


def _open_dst(dst: str, draft: Manifest) -> tuple[BlockStore, set[int]]:
    """Create the store, or resume one an earlier run of the same convert left; returns the good blocks."""
    done: set[int] = set()
    previous = None
    if os.path.exists(os.path.join(dst, MANIFEST)):
        previous = read_manifest(dst)
        if previous.source != draft.source or [b.tensors for b in previous.blocks] != [b.tensors for b in draft.blocks]:
            raise ValueError(f"{dst!r} holds a store converted from another source or with other options "
                             f"({previous.source}); pick another DST or delete it")
    elif os.path.isdir(dst) and [f for f in os.listdir(dst) if not f.startswith((".zo2tier", "block_", HF_FILES_DIR))]:
        raise ValueError(f"{dst!r} exists and holds other files; convert into a new or empty directory")
    store = BlockStore.create(dst, draft if previous is None else previous)
    if previous is not None:
        store.manifest = previous
        for entry in previous.blocks:
            if entry.file is None:
                continue
            try:
                store.verify(entry.index)
                done.add(entry.index)
            except StoreCorruptError:
                pass  # written again below
    return store, done


def _open_source(src: str, seed: int) -> tuple[dict, TensorSource, torch.dtype]:
    """(config dict, tensor source, source dtype) for any accepted SRC."""
    if os.path.isfile(src) and src.endswith(".json"):
        config = _read_json(src)
        return config, RandomSource(config, torch.float32, seed, {}), _config_dtype(config)
    if os.path.isfile(src) and src.endswith(".gguf"):
        return _gguf(os.path.dirname(src), os.path.basename(src))
    if not os.path.isdir(src):
        raise ValueError(f"SRC {src!r} is neither a model directory nor a config.json; give one of them")
    cfg_path = os.path.join(src, "config.json")
    ggufs = sorted(glob.glob(os.path.join(src, "*.gguf")))
    if not os.path.exists(cfg_path):
        if ggufs:
            return _gguf(src, os.path.basename(ggufs[0]))
        if os.path.isfile(os.path.join(src, "manifest.json")):
            raise ValueError(f"{src!r} is already a zo2tier store: fine-tune, export or generate from it as it "
                             "is (`zo2tier export` writes it as a Hugging Face folder)")
        raise ValueError(f"{src!r} has no config.json; give a Hugging Face model directory")
    config = _read_json(cfg_path)
    resolve = _resolver_for(config)
    files = safetensors_files(src)
    if files:
        source = SafetensorsSource(files, resolve)
        return config, source, source.common_dtype()
    binary = os.path.join(src, "pytorch_model.bin")
    if os.path.exists(binary):
        tensors = torch.load(binary, map_location="cpu", mmap=True, weights_only=True)
        source = DictSource(tensors, resolve, "pytorch_model.bin", [binary])
        return config, source, source.common_dtype()
    if ggufs:
        return _gguf(src, os.path.basename(ggufs[0]))
    return config, RandomSource(config, torch.float32, seed, {}), _config_dtype(config)


def _gguf(directory: str, file: str) -> tuple[dict, TensorSource, torch.dtype]:
    """A GGUF file streamed tensor by tensor (dequantized one at a time), as fp32."""
    from zo2tier.model.gguf import GGUFTensors
    from zo2tier.model.loading import gguf_skeleton
    from zo2tier.model_ref import gguf_config

    config = gguf_config(os.path.join(directory, file))
    tensors = GGUFTensors(os.path.join(directory, file), config, gguf_skeleton(config))
    source = GGUFSource(tensors, _resolver_for(config))
    return config, source, source.common_dtype()


def _resolver_for(config: dict):
    from zo2tier.checkpoint import skeleton_from_config
    from zo2tier.model.names import name_resolver

    return name_resolver(skeleton_from_config(config, torch.float32))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _config_dtype(config: dict) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


__all__ = ["ConvertReport", "StoreFormatError", "block_layout", "convert"]
