"""A store directory, opened: locked, its manifest parsed, its block files read and written safely.

Copy-on-write by generations. A block is never overwritten in place: :meth:`BlockStore.write_block`
writes a new file ``block_<index>_g<generation>.bin`` (``.tmp``, fsync, rename) and makes it the block's
*current* copy. The manifest on disk (the *committed* copies) changes only in :meth:`BlockStore.commit`,
atomically; only then are copies that no committed manifest names deleted. A crash at any instant thus
leaves the last committed manifest and every file it names intact.

Bytes only, no math: what the bytes mean is zo2tier.tiers.codec's business. A block may be stored as zstd
frames (``compress=``, zo2tier.store.zstd); reads and writes then go through a pool of frame threads,
started at the first compressed read or write and stopped by :meth:`BlockStore.close`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from zo2tier.store.format import (
    MANIFEST,
    BlockEntry,
    FrameLayout,
    Manifest,
    StoreFormatError,
    checksum,
    fsync_dir,
    read_manifest,
    write_json_atomic,
)
from zo2tier.store.io import BlockFile, aligned_empty, raise_if_no_space
from zo2tier.store.lock import MARKER, lock_dir, unlock_dir
from zo2tier.store.zstd import ZSTD_THREADS, FrameCorruptError, FramePool, Zstd

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

_GEN = re.compile(r"^block_(\d+)_g(\d+)\.bin$")
_FIX = ("restore it from a backup, re-run `zo2tier convert` into this store to rewrite damaged blocks, "
        "or resume from an earlier checkpoint")
_fault_delay_s = 0.0  # tests only: widen the window inside a block write so SIGKILL lands there


class StoreCorruptError(StoreFormatError):
    """A block file is missing, truncated or fails its checksum; the message names the block and file."""


class BlockStore:
    """A locked store directory. Construction touches nothing; use :meth:`create` or :meth:`open`.

    Example::

        with BlockStore.open("runs/opt-1.3b") as store:
            raw = store.read_bytes(3)  # block 3's stored bytes, checksum verified
    """

    def __init__(self, path: str | os.PathLike, *, verify_reads: bool = True, zstd_threads: int = ZSTD_THREADS) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.verify_reads = verify_reads
        self._frames = FramePool(zstd_threads)  # threads start at the first compressed block read or written
        self.manifest: Manifest | None = None  # the committed manifest
        self._current: list[BlockEntry] = []
        self._guard = threading.Lock()
        self._draft: Manifest | None = None  # what commit() starts from before the first commit
        self._next_gen = 1
        self._locked = False
        self.base: BlockStore | None = None  # an overlay's base store: its blocks name the base's files until changed

    # ---- opening ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, manifest: Manifest, *, verify_reads: bool = True) -> BlockStore:
        """Lock ``path`` (created if needed) as a new store whose blocks are described by ``manifest``.

        Nothing is committed until :meth:`commit`; files of an earlier store in ``path`` stay until then.
        """
        store = cls(path, verify_reads=verify_reads)
        os.makedirs(store.path, exist_ok=True)
        store._lock()
        try:
            with open(os.path.join(store.path, MARKER), "w") as f:
                f.write('{"created_by": "zo2tier"}')
            store._scan_generations()
            store.manifest = None
            store._current = list(manifest.blocks)
            store._draft = manifest
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify_reads: bool = True, allow_incomplete: bool = False,
             lock: bool = True, shared: bool = False) -> BlockStore:
        """Lock and open an existing store; checks every block file's size (cheap) before returning.

        ``shared``: a read-only user (the base of :meth:`overlay`s), sharing the lock with other readers."""
        store = cls(path, verify_reads=verify_reads)
        if not os.path.isdir(store.path):
            raise StoreFormatError(f"store {store.path!r} does not exist; create it with `zo2tier convert SRC DST`")
        if lock:
            store._lock(shared=shared)
        try:
            manifest = read_manifest(store.path)
            if not manifest.complete and not allow_incomplete:
                raise StoreFormatError(f"store {store.path!r} is incomplete (a convert was interrupted); "
                                       "re-run the same `zo2tier convert` command to finish it")
            store.manifest = manifest
            store._current = list(manifest.blocks)
            store._draft = manifest
            store._scan_generations()
            for entry in manifest.blocks:
                if entry.file is not None or manifest.complete:
                    store.check_size(entry)
            store._lock_base()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def overlay(cls, base: BlockStore, path: str | os.PathLike, *, verify_reads: bool = True) -> BlockStore:
        """A new store at ``path`` holding ``base``'s model, whose blocks name ``base``'s files (by absolute
        path) until they are written: a fine-tune's changed blocks land in ``path`` and ``base`` is never
        changed. Nothing is copied. The overlay closes ``base`` when it is closed."""
        if base.manifest is None:
            raise StoreFormatError(f"store {base.path!r} has no committed manifest; it cannot be a base")
        blocks = [replace(e, file=base.file_path(e)) for e in base.entries]
        store = cls.create(path, base.manifest.with_blocks(blocks, pinned=()), verify_reads=verify_reads)
        store.base = base
        return store

    def _lock_base(self) -> None:
        """An overlay whose blocks name another store's files holds that base shared while it is open, so no
        --in-place run changes the files it reads."""
        bases = {os.path.dirname(self.file_path(e)) for e in self._current if e.file is not None and not self._owns(e.file)}
        if not self._locked or not bases or self.base is not None:
            return
        if len(bases) > 1:
            raise StoreFormatError(f"store {self.path!r} names block files in {len(bases)} other stores "
                                   f"({sorted(bases)[:2]}); an overlay has one base: re-create it")
        self.base = BlockStore.open(bases.pop(), verify_reads=self.verify_reads, shared=True)

    def _owns(self, file: str) -> bool:
        """True for a file in this store's directory (an overlay never deletes its base's files)."""
        return os.path.dirname(os.path.join(self.path, file)) == self.path

    def _lock(self, shared: bool = False) -> None:
        self._role = "base" if shared else "store"
        lock_dir(self.path, role=self._role)
        self._locked = True

    def _scan_generations(self) -> None:
        for name in os.listdir(self.path):
            m = _GEN.match(name.removesuffix(".tmp"))
            if m:
                self._next_gen = max(self._next_gen, int(m.group(2)) + 1)
            if name.startswith("block_") and name.endswith(".tmp"):
                os.unlink(os.path.join(self.path, name))  # a write a crash interrupted: never named anywhere

    def close(self) -> None:
        """Release the lock. Uncommitted block copies stay on disk until the next commit collects them."""
        self._frames.close()
        if self._locked:
            unlock_dir(self.path, role=self._role)
            self._locked = False
        if self.base is not None:
            self.base.close()
            self.base = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- entries ----------------------------------------------------------------------------------
    @property
    def entries(self) -> list[BlockEntry]:
        """The current entry of every block (may be ahead of the committed manifest)."""
        return list(self._current)

    def entry(self, index: int) -> BlockEntry:
        return self._current[index]

    def file_path(self, entry: BlockEntry) -> str:
        if entry.file is None:
            raise StoreFormatError(f"block {entry.name} of store {self.path!r} has not been written yet")
        return os.path.join(self.path, entry.file)

    def set_applied(self, index: int, applied_steps: int) -> None:
        """Record that block ``index``'s current file holds the first ``applied_steps`` log entries."""
        with self._guard:
            self._current[index] = replace(self._current[index], applied_steps=applied_steps)

    def adopt(self, states: list[list]) -> None:
        """Make a checkpoint's compact block states current: [name, file, xxh3_64, dtype, applied_steps] and,
        since format v2, the zstd layout (None for a block stored as is)."""
        if len(states) != len(self._current):
            raise StoreFormatError(f"the checkpoint lists {len(states)} blocks but store {self.path!r} has "
                                   f"{len(self._current)}; it belongs to another model")
        for i, state in enumerate(states):
            name, file, digest, dtype, applied = state[:5]
            layout = state[5] if len(state) > 5 else None
            entry = self._current[i]
            if entry.name != name:
                raise StoreFormatError(f"the checkpoint's block {i} is {name!r} but store {self.path!r} has "
                                       f"{entry.name!r}; it belongs to another model")
            new = replace(entry, file=file, xxh3_64=digest, dtype=dtype, applied_steps=int(applied),
                          zstd=FrameLayout.from_json(layout).check(entry.nbytes, name) if layout else None)
            if not os.path.exists(os.path.join(self.path, file)):
                raise StoreCorruptError(
                    f"block {name}: file {os.path.join(self.path, file)} named by the checkpoint is gone; a later "
                    "checkpoint of this store replaced it: resume from the latest checkpoint")
            self.check_size(new)
            self._current[i] = new
        self._lock_base()

    # ---- checks -----------------------------------------------------------------------------------
    def check_size(self, entry: BlockEntry) -> None:
        """Raise StoreCorruptError unless the block's file exists and is long enough (no read)."""
        path = self.file_path(entry)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise StoreCorruptError(f"block {entry.name}: file {path} is missing; {_FIX}") from None
        if size < entry.offset + entry.file_bytes:
            raise StoreCorruptError(f"block {entry.name}: file {path} is truncated ({size} bytes, needs "
                                    f"{entry.offset + entry.file_bytes}); {_FIX}")

    def _frame_pool(self) -> FramePool:
        with self._guard:
            return self._frames.open()

    def _corrupt_frame(self, entry: BlockEntry, exc: FrameCorruptError) -> StoreCorruptError:
        return StoreCorruptError(f"block {entry.name}: file {self.file_path(entry)}: {exc}; {_FIX}")

    def _check_digest(self, entry: BlockEntry, buf: torch.Tensor) -> None:
        if entry.xxh3_64 is None or entry.zstd is not None:  # frames are checked one by one as they are read
            return
        got = checksum(memoryview(buf.numpy())[: entry.nbytes])
        if got != entry.xxh3_64:
            raise StoreCorruptError(f"block {entry.name}: file {self.file_path(entry)} fails its checksum "
                                    f"(xxh3_64 {got}, manifest says {entry.xxh3_64}); {_FIX}")

    def verify(self, index: int | None = None, chunk_bytes: int = 64 << 20) -> None:
        """Re-read block ``index`` (default: all) and check its xxh3_64, ``chunk_bytes`` at a time."""
        import xxhash

        for entry in self._current if index is None else [self._current[index]]:
            self.check_size(entry)
            if entry.zstd is not None:
                self._verify_frames(entry)
                continue
            h = xxhash.xxh3_64()
            with open(self.file_path(entry), "rb", buffering=0) as f:
                f.seek(entry.offset)
                left = entry.nbytes
                while left:
                    data = f.read(min(left, chunk_bytes))
                    if not data:
                        break
                    h.update(data)
                    left -= len(data)
            if h.hexdigest() != entry.xxh3_64:
                raise StoreCorruptError(f"block {entry.name}: file {self.file_path(entry)} fails its checksum "
                                        f"(xxh3_64 {h.hexdigest()}, manifest says {entry.xxh3_64}); {_FIX}")

    def _verify_frames(self, entry: BlockEntry) -> None:
        layout = entry.zstd
        with open(self.file_path(entry), "rb", buffering=0) as f:
            for k, (n_bytes, digest) in enumerate(layout.frames):
                f.seek(entry.offset + k * layout.slot_bytes)
                got = checksum(f.read(n_bytes))
                if got != digest:
                    raise self._corrupt_frame(entry, FrameCorruptError(
                        k, f"fails its checksum (xxh3_64 {got}, manifest says {digest})"))

    # ---- reads and writes -------------------------------------------------------------------------
    def read_into(self, index: int, buf: torch.Tensor, *, direct: bool = False) -> BlockEntry:
        """Fill uint8 ``buf`` (4 KiB-aligned if ``direct``) with block ``index``'s bytes; checks them."""
        entry = self._current[index]
        path = self.file_path(entry)
        try:
            f = BlockFile.open(path, write=False, direct=direct)
        except FileNotFoundError:
            raise StoreCorruptError(f"block {entry.name}: file {path} is missing; {_FIX}") from None
        with f:
            size = f.size_bytes()
            if size < entry.offset + entry.file_bytes:
                raise StoreCorruptError(f"block {entry.name}: file {path} is truncated ({size} bytes, needs "
                                        f"{entry.offset + entry.file_bytes}); {_FIX}")
            if entry.zstd is not None:  # decompressed by the frame threads straight into buf
                try:
                    self._frame_pool().read(f, entry.zstd, memoryview(buf.reshape(-1).numpy())[: entry.nbytes],
                                            verify=self.verify_reads, offset=entry.offset, what=f"block {entry.name}")
                except FrameCorruptError as exc:
                    raise self._corrupt_frame(entry, exc) from None
                return entry
            f.read_into(buf, entry.nbytes, offset=entry.offset, what=f"block {entry.name}")
        if self.verify_reads:
            self._check_digest(entry, buf)
        return entry

    def read_bytes(self, index: int) -> torch.Tensor:
        """Block ``index``'s stored bytes in a new uint8 tensor (checked)."""
        entry = self._current[index]
        buf = aligned_empty(entry.nbytes)
        self.read_into(index, buf)
        return buf[: entry.nbytes]

    def write_block(self, index: int, buf: torch.Tensor, *, dtype: str | None = None, direct: bool = False,
                    applied_steps: int | None = None, compress: Zstd | None = None) -> BlockEntry:
        """Write uint8 ``buf`` as a new copy of block ``index`` and make it current (not yet committed).

        ``buf`` must hold the block's encoded bytes (``dtype``, default: unchanged); with ``direct`` it must
        be 4 KiB-aligned and padded. ``compress``: store them as zstd frames (default: as they are). The
        previous current copy is deleted unless a committed manifest names it. Safe to call from several
        threads for different blocks.
        """
        old = self._current[index]
        entry = replace(old, dtype=dtype or old.dtype, offset=0)
        if applied_steps is not None:
            entry = replace(entry, applied_steps=applied_steps)
        view = buf.reshape(-1)
        digest = checksum(memoryview(view.numpy())[: entry.nbytes]) if compress is None else None
        layout = None
        with self._guard:
            gen, self._next_gen = self._next_gen, self._next_gen + 1
        name = f"block_{index:05d}_g{gen:06d}.bin"
        final = os.path.join(self.path, name)
        tmp = final + ".tmp"
        what = f"block {entry.name} of store {self.path}"
        try:
            with BlockFile.open(tmp, write=True, direct=direct) as f:
                if compress is not None:
                    layout = self._frame_pool().write(f, memoryview(view.numpy())[: entry.nbytes], compress, what=what)
                else:
                    f.write_from(view, entry.nbytes, what=what)
                    if not f.direct:
                        f.truncate(entry.nbytes)
                f.sync(what=what, n_bytes=entry.nbytes)
            if _fault_delay_s:
                time.sleep(_fault_delay_s)
            os.replace(tmp, final)
        except BaseException:
            _unlink_quiet(tmp)  # the current copy is intact; a partial .tmp would only hold space
            raise
        entry = replace(entry, file=name, xxh3_64=digest or layout.digest, zstd=layout)
        with self._guard:
            self._current[index] = entry
            committed = {b.file for b in self.manifest.blocks} | set(self.manifest.pinned) if self.manifest else set()
        if old.file is not None and old.file != name and old.file not in committed and self._owns(old.file):
            _unlink_quiet(os.path.join(self.path, old.file))
        return entry

    def write_block_stream(self, index: int, pieces, *, dtype: str | None = None,
                           applied_steps: int = 0, compress: Zstd | None = None) -> BlockEntry:
        """Like :meth:`write_block`, from an iterable of byte pieces (memoryview/bytes) written in order."""

        old = self._current[index]
        entry = replace(old, dtype=dtype or old.dtype, offset=0, applied_steps=applied_steps)
        with self._guard:
            gen, self._next_gen = self._next_gen, self._next_gen + 1
        name = f"block_{index:05d}_g{gen:06d}.bin"
        final = os.path.join(self.path, name)
        tmp = final + ".tmp"
        written, layout, what = 0, None, f"block {entry.name} of store {self.path}"
        try:
            if compress is not None:
                with BlockFile.open(tmp, write=True, direct=False) as f:
                    layout, written = self._frame_pool().write_stream(f, pieces, compress, what=what)
                    f.sync(what=what, n_bytes=written)
                digest = layout.digest
            else:
                digest, written = _write_pieces(tmp, pieces)
            if written != entry.nbytes:
                raise RuntimeError(f"block {entry.name}: wrote {written} bytes, the format needs {entry.nbytes}")
            os.replace(tmp, final)
        except BaseException as exc:
            _unlink_quiet(tmp)
            if isinstance(exc, OSError):  # a full disk: name the store, the block and the bytes
                raise_if_no_space(exc, what, tmp, entry.nbytes, written)
            raise
        entry = replace(entry, file=name, xxh3_64=digest, zstd=layout)
        with self._guard:
            self._current[index] = entry
        if old.file is not None and old.file != name and self._owns(old.file) and (
                self.manifest is None or old.file not in {b.file for b in self.manifest.blocks}):
            _unlink_quiet(os.path.join(self.path, old.file))
        return entry

    # ---- committing -------------------------------------------------------------------------------
    def commit(self, *, step: int | None = None, log: list | tuple | None = None, perturbation: str | None = None,
               complete: bool = True, source: dict | None = None, pin: bool = False) -> Manifest:
        """Atomically make the current entries the store's manifest, then delete unnamed block copies.

        ``log`` holds the rows ``[min applied_steps, step)``; it is checked against the entries. ``pin``
        keeps the committed files until the next pinned commit (a checkpoint names them).
        """
        base = self.manifest or self._draft
        with self._guard:
            blocks = list(self._current)
        step = base.step if step is None else step
        rows = tuple(tuple(r) for r in (base.log if log is None else log))
        low = min(b.applied_steps for b in blocks)
        if step - len(rows) > low or any(b.applied_steps > step for b in blocks):
            raise RuntimeError(f"store {self.path}: log rows {step - len(rows)}..{step} cannot bring blocks "
                               f"holding {low}..{max(b.applied_steps for b in blocks)} updates to step {step}")
        rows = rows[len(rows) - (step - low):] if step > low else ()
        manifest = base.with_blocks(blocks, step=step, log=rows, complete=complete,
                                    perturbation=perturbation or base.perturbation,
                                    source=base.source if source is None else source,
                                    pinned=tuple(b.file for b in blocks) if pin else base.pinned)
        fsync_dir(self.path)  # the renames of the block files first, then the manifest that names them
        write_json_atomic(os.path.join(self.path, MANIFEST), manifest.to_json())
        self.manifest = manifest
        self._collect()
        return manifest

    def _collect(self) -> None:
        """Delete block files that neither the committed manifest nor a current entry names."""
        with self._guard:
            keep = {b.file for b in self.manifest.blocks} | {b.file for b in self._current} | set(self.manifest.pinned)
        for name in os.listdir(self.path):
            if name.startswith("block_") and name.endswith(".bin") and name not in keep:
                _unlink_quiet(os.path.join(self.path, name))


def _write_pieces(path: str, pieces) -> tuple[str, int]:
    """Write byte pieces in order to a new file ``path``, fsync it; returns (xxh3_64, bytes written)."""
    import xxhash

    h, written = xxhash.xxh3_64(), 0
    with open(path, "wb", buffering=0) as f:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            h.update(view)
            written += len(view)
            while view:
                view = view[f.write(view):]
        os.fsync(f.fileno())
    return h.hexdigest(), written


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
