"""Store format v1/v2: the manifest (what each block file holds), checksums, and atomic JSON writes.

Bytes and JSON only, no math. ``docs/store.md`` is the reference; this module is its implementation.

A store is a directory::

    manifest.json                 this module's Manifest, written atomically
    block_00000_g000003.bin       one file per block; the name carries a generation number
    .zo2tier-disk, .zo2tier.lock  marker and flock (see zo2tier.store.lock)

A block's bytes are its parameters laid back to back in one flat buffer (the engine's layout), encoded as
the block's storage dtype (zo2tier.tiers.codec): fp32/bf16/fp16 little-endian, or int8 with one fp32
scale per group of INT8_GROUP consecutive elements of the flat buffer, the scales after the int8 payload.

Version 2 adds one optional field per block, ``zstd`` (:class:`FrameLayout`): those bytes are stored as
independent zstd frames (zo2tier.store.zstd). A manifest without compressed blocks is still written as
version 1, so older zo2tier reads it; this one reads both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

import xxhash

from zo2tier.store.io import align_up, raise_if_no_space
from zo2tier.tiers.codec import INT8_GROUP  # one source of truth for the int8 group size

FORMAT = "zo2tier-store"
VERSION = 2  # the newest version this zo2tier reads and writes
READS_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
ALIGN_BYTES = 4096
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


class StoreFormatError(ValueError):
    """The store's manifest or a block file is missing, malformed, corrupt or of another version."""


def checksum(buf: memoryview | bytes) -> str:
    """xxh3-64 of ``buf`` as 16 hex digits (the manifest's ``xxh3_64`` field)."""
    return xxhash.xxh3_64_hexdigest(buf)


def int8_layout(numel: int) -> dict[str, int]:
    """Where the fp32 scales of an int8 block start (bytes) and how many there are."""
    return {"group": INT8_GROUP, "scales_offset": (numel + 3) // 4 * 4, "n_scales": -(-numel // INT8_GROUP)}


def encoded_nbytes(numel: int, dtype: str) -> int:
    """Bytes of a block of ``numel`` elements stored as ``dtype`` (same rule as zo2tier.tiers.codec)."""
    if dtype not in _ITEMSIZE:
        raise StoreFormatError(f"storage dtype {dtype!r} is unknown; a v1 store holds fp32, bf16, fp16 or int8")
    if dtype == "int8":
        layout = int8_layout(numel)
        return layout["scales_offset"] + 4 * layout["n_scales"]
    return numel * _ITEMSIZE[dtype]


@dataclass(frozen=True)
class TensorEntry:
    """A parameter inside a block: ``flat[offset : offset + numel]`` (element offsets)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    param_id: int
    decay: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "offset": self.offset, "numel": self.numel,
                "param_id": self.param_id, "decay": self.decay}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorEntry:
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), int(d["offset"]), int(d["numel"]),
                   int(d["param_id"]), bool(d["decay"]))


def zstd_bound(n_bytes: int) -> int:
    """ZSTD_compressBound: the most bytes one zstd frame of ``n_bytes`` input can take."""
    return n_bytes + (n_bytes >> 8) + (((128 << 10) - n_bytes) >> 11 if n_bytes < 128 << 10 else 0)


def slot_bytes(frame_bytes: int) -> int:
    """Bytes reserved in a block file for one zstd frame of ``frame_bytes`` input: its worst case, 4 KiB-aligned."""
    return align_up(zstd_bound(frame_bytes))


@dataclass(frozen=True)
class FrameLayout:
    """How a compressed block lies in its file (the manifest's ``zstd`` field; docs/store.md).

    The block's ``nbytes`` encoded bytes are cut into frames of ``frame_bytes`` (the last one shorter),
    each an independent zstd frame. Frame k starts at byte ``k * slot_bytes`` of the file, where
    ``slot_bytes`` reserves the frame's worst-case size (4 KiB-aligned), and takes its compressed length
    zero-padded to 4 KiB. ``frames`` holds ``(compressed length, xxh3_64 of those bytes)`` per frame.
    """

    level: int
    frame_bytes: int
    frames: tuple[tuple[int, str], ...]

    @property
    def slot_bytes(self) -> int:
        return slot_bytes(self.frame_bytes)

    @property
    def stored_bytes(self) -> int:
        """Compressed bytes, padding excluded (what the disk reads, near enough)."""
        return sum(c for c, _ in self.frames)

    @property
    def extent_bytes(self) -> int:
        """How long the file must be: the last frame's slot start plus its padded length."""
        return (len(self.frames) - 1) * self.slot_bytes + align_up(self.frames[-1][0])

    @property
    def digest(self) -> str:
        """One xxh3_64 for the block (the manifest's ``xxh3_64``): the hash of the frame hashes."""
        return checksum(",".join(d for _, d in self.frames).encode())

    def check(self, nbytes: int, name: str) -> FrameLayout:
        n = -(-nbytes // self.frame_bytes)
        if self.frame_bytes <= 0 or self.frame_bytes % ALIGN_BYTES or len(self.frames) != n:
            raise StoreFormatError(f"block {name}: zstd layout of {len(self.frames)} frames of {self.frame_bytes} "
                                   f"bytes does not cover its {nbytes} bytes; the manifest is damaged")
        if any(not 0 < c <= zstd_bound(self.frame_bytes) for c, _ in self.frames):
            raise StoreFormatError(f"block {name}: a zstd frame length is out of range; the manifest is damaged")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "frame_bytes": self.frame_bytes, "slot_bytes": self.slot_bytes,
                "stored_bytes": self.stored_bytes, "frames": [list(f) for f in self.frames]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FrameLayout:
        return cls(int(d["level"]), int(d["frame_bytes"]), tuple((int(c), str(h)) for c, h in d["frames"]))


@dataclass(frozen=True)
class BlockEntry:
    """One block: its file, where its bytes lie, how they are encoded, and which log prefix they hold.

    ``file`` is ``None`` only while a store is being created (the block is not written yet).
    """

    index: int
    name: str
    dtype: str
    numel: int
    tensors: tuple[TensorEntry, ...]
    file: str | None = None
    offset: int = 0
    xxh3_64: str | None = None
    applied_steps: int = 0
    zstd: FrameLayout | None = None  # compressed as zstd frames (format v2); None: nbytes stored as is

    @property
    def nbytes(self) -> int:
        """The block's encoded (uncompressed) bytes."""
        return encoded_nbytes(self.numel, self.dtype)

    @property
    def file_bytes(self) -> int:
        """How long the block's file must be from ``offset`` on."""
        return self.zstd.extent_bytes if self.zstd is not None else self.nbytes

    def to_json(self) -> dict[str, Any]:
        out = {"index": self.index, "name": self.name, "file": self.file, "offset": self.offset,
               "nbytes": self.nbytes, "dtype": self.dtype, "numel": self.numel, "xxh3_64": self.xxh3_64,
               "applied_steps": self.applied_steps, "tensors": [t.to_json() for t in self.tensors]}
        if self.dtype == "int8":
            out["int8"] = int8_layout(self.numel)
        if self.zstd is not None:
            out["zstd"] = self.zstd.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BlockEntry:
        entry = cls(int(d["index"]), str(d["name"]), str(d["dtype"]), int(d["numel"]),
                    tuple(TensorEntry.from_json(t) for t in d["tensors"]), d.get("file"), int(d.get("offset", 0)),
                    d.get("xxh3_64"), int(d.get("applied_steps", 0)),
                    FrameLayout.from_json(d["zstd"]) if d.get("zstd") is not None else None)
        if entry.zstd is not None:
            entry.zstd.check(entry.nbytes, entry.name)
        if int(d.get("nbytes", entry.nbytes)) != entry.nbytes:
            raise StoreFormatError(f"block {entry.name}: nbytes {d['nbytes']} does not match {entry.numel} "
                                   f"{entry.dtype} elements ({entry.nbytes} bytes); the manifest is damaged")
        if entry.offset % ALIGN_BYTES:
            raise StoreFormatError(f"block {entry.name}: offset {entry.offset} is not 4 KiB-aligned")
        return entry

    def state(self) -> list:
        """The compact form a checkpoint keeps: [name, file, xxh3_64, dtype, applied_steps, zstd layout or None]."""
        return [self.name, self.file, self.xxh3_64, self.dtype, self.applied_steps,
                self.zstd.to_json() if self.zstd is not None else None]


@dataclass(frozen=True)
class Manifest:
    """The whole store: model config, blocks, and the update-log tail not yet folded into every block.

    ``log`` holds entries ``log_start .. step-1`` (``log_start`` = the smallest ``applied_steps``), as
    ``[step, step_seed, projected_grad, lr, weight_decay]`` rows; replaying them with z of kind
    ``perturbation`` brings every block to ``step``.
    """

    config: dict[str, Any]
    dtype: str  # compute dtype of the model: fp32, bf16 or fp16
    blocks: tuple[BlockEntry, ...]
    step: int = 0
    log: tuple[tuple, ...] = ()
    perturbation: str = "gaussian"
    complete: bool = True
    source: dict[str, Any] = field(default_factory=dict)
    pinned: tuple[str, ...] = ()  # block files the latest checkpoint names: kept until the next one

    @property
    def log_start(self) -> int:
        return self.step - len(self.log)

    def with_blocks(self, blocks: list[BlockEntry] | tuple[BlockEntry, ...], **kw: Any) -> Manifest:
        return replace(self, blocks=tuple(blocks), **kw)

    def to_json(self) -> dict[str, Any]:
        version = VERSION if any(b.zstd is not None for b in self.blocks) else 1  # v1 readers still read it
        return {"format": FORMAT, "version": version, "complete": self.complete, "dtype": self.dtype,
                "step": self.step, "log_start": self.log_start, "perturbation": self.perturbation,
                "log": [list(r) for r in self.log], "source": self.source, "pinned": list(self.pinned), "config": self.config,
                "blocks": [b.to_json() for b in self.blocks]}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise StoreFormatError(f"{where} is not a zo2tier store manifest (format={d.get('format')!r}); "
                                   "create one with `zo2tier convert SRC DST`")
        if d.get("version") not in READS_VERSIONS:
            raise StoreFormatError(f"{where} is store format version {d.get('version')}; this zo2tier reads "
                                   f"versions {', '.join(map(str, READS_VERSIONS))}: upgrade zo2tier or re-convert the model")
        blocks = tuple(BlockEntry.from_json(b) for b in d["blocks"])
        for i, b in enumerate(blocks):
            if b.index != i:
                raise StoreFormatError(f"{where}: block {b.name} has index {b.index} at position {i}")
        log = tuple(tuple(r) for r in d.get("log", []))
        m = cls(dict(d["config"]), str(d["dtype"]), blocks, int(d.get("step", 0)), log,
                str(d.get("perturbation", "gaussian")), bool(d.get("complete", True)), dict(d.get("source", {})),
                tuple(d.get("pinned", ())))
        if int(d.get("log_start", m.log_start)) != m.log_start:
            raise StoreFormatError(f"{where}: log_start {d['log_start']} disagrees with step {m.step} and "
                                   f"{len(log)} log rows; the manifest is damaged")
        return m


def read_manifest(directory: str) -> Manifest:
    """Parse ``directory/manifest.json``; raises StoreFormatError naming the file and the fix."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise StoreFormatError(f"{directory!r} has no {MANIFEST}; it is not a zo2tier store "
                               "(create one with `zo2tier convert SRC DST`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"{path} is not valid JSON ({exc}); restore the store from a backup "
                               "or re-convert the model") from None
    try:
        return Manifest.from_json(data, path)
    except StoreFormatError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # a field missing or mistyped
        raise StoreFormatError(f"{path} is damaged ({type(exc).__name__}: {exc}); restore the store from a "
                               "backup or re-convert the model") from None


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a crash leaves either the old or the new file.

    Write ``path.tmp``, fsync it, rename it over ``path``, fsync the directory.
    """
    tmp = path + ".tmp"
    body = json.dumps(data, indent=1, allow_nan=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:  # a full disk: the old file stays; no partial .tmp is left behind
        os.close(fd)
        _unlink_quiet(tmp)
        raise_if_no_space(exc, f"the manifest of store {os.path.dirname(os.path.abspath(path))}", path,
                          len(body), len(body) - len(view))
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_dir(directory: str) -> None:
    """Make renames and creations inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
