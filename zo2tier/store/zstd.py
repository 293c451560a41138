"""zstd on disk-tier blocks: the option, and reading / writing a block as independent zstd frames.

Bytes only, no math. zstd decompresses one frame on one thread, so a block is cut into frames of
``frame_bytes`` (:class:`zo2tier.store.format.FrameLayout` says where each lies) and a pool of threads
works on several frames at once; python-zstandard releases the GIL inside zstd, and ``os.preadv`` /
``os.pwritev`` release it too. Each frame task moves its own frame end to end:

- read: ``preadv`` the frame (O_DIRECT when the file allows: 4 KiB-aligned slot offset and padded length)
  into the thread's scratch, check its xxh3_64, decompress it straight into its place in the caller's
  buffer (the pinned staging buffer, through ``stream_reader(...).readinto``: no full-size copy);
- write: compress the frame (``ZstdCompressor.compress``), copy it into the thread's aligned scratch,
  zero-pad it to 4 KiB and ``pwritev`` it at its slot.

Memory: one scratch of ``slot_bytes`` (a frame's worst case, 4 MiB + 16 KiB by default) per pool thread.
Whether zstd pays, and the numbers behind the default (off), are in docs/io.md ("zstd on the disk tier").
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zstandard

from zo2tier.store.format import FrameLayout, StoreFormatError, checksum, slot_bytes
from zo2tier.store.io import ALIGN_BYTES, BlockFile, align_up, aligned_empty

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

# Off: on every machine measured so far zstd decompresses slower than the disk reads (2.2 GB/s), so it
# would lengthen the step. docs/io.md, "zstd on the disk tier", has the numbers and when to turn it on.
DEFAULT_DISK_COMPRESS: str | None = None
ZSTD_LEVEL = 1  # level 1 already reaches the ratio weights allow (docs/io.md); higher levels only slow down
ZSTD_FRAME_BYTES = 4 << 20  # 100 frames per 13B-model block: enough to keep 16 threads busy
ZSTD_THREADS = min(16, os.cpu_count() or 1)  # the pool that (de)compresses frames; the GPU machine has 16 cores


@dataclass(frozen=True)
class Zstd:
    """zstd for disk-tier blocks: ``ZOEngine(compress=Zstd(level=3))``; ``compress="zstd"`` is ``Zstd()``.

    ``frame_bytes`` (a multiple of 4 KiB) is the uncompressed size of one independent frame.
    """

    level: int = ZSTD_LEVEL
    frame_bytes: int = ZSTD_FRAME_BYTES

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, int) or not -7 <= self.level <= 22:
            raise ValueError(f"zstd level {self.level!r} is out of range; use an int from -7 to 22 (1 is the default)")
        if (isinstance(self.frame_bytes, bool) or not isinstance(self.frame_bytes, int) or self.frame_bytes <= 0
                or self.frame_bytes % ALIGN_BYTES):
            raise ValueError(f"zstd frame_bytes={self.frame_bytes!r} must be a positive multiple of 4096, "
                             f"e.g. {ZSTD_FRAME_BYTES}")


def parse_compress(value: str | Zstd | Mapping[str, str | Zstd | None] | None) -> Zstd | None:
    """``compress=`` as the engine, convert and the CLI take it -> the disk tier's :class:`Zstd`, or None (off).

    Accepts ``None`` (the default, :data:`DEFAULT_DISK_COMPRESS`), ``"zstd"``, ``"none"``, a :class:`Zstd`,
    or a per-tier mapping like ``storage=``, which may name only the disk tier: ``{"disk": "zstd"}``.

    >>> parse_compress("zstd")
    Zstd(level=1, frame_bytes=4194304)
    >>> parse_compress({"disk": "none"}) is None
    True
    """
    if isinstance(value, Mapping):
        other = sorted(set(value) - {"disk"})
        if other:
            raise ValueError(f"compress names tier(s) {other}; only the disk tier can be compressed (device and "
                             "host blocks are read from memory every visit, where zstd would only cost time)")
        value = value.get("disk", "none")
    if value is None:
        value = DEFAULT_DISK_COMPRESS or "none"
    if isinstance(value, Zstd):
        return value
    if isinstance(value, str) and value.strip().lower() in ("zstd", "none", "off"):
        return Zstd() if value.strip().lower() == "zstd" else None
    raise ValueError(f"compress={value!r} is unknown; use 'zstd' or 'none' (or {{'disk': 'zstd'}})")


class FrameCorruptError(StoreFormatError):
    """A frame's bytes fail their checksum or do not decompress; the caller names the block and file."""

    def __init__(self, frame: int, detail: str) -> None:
        super().__init__(f"zstd frame {frame} {detail}")
        self.frame = frame


class FramePool:
    """Threads that read, decompress, compress and write the frames of blocks. Construction starts nothing.

    Example::

        with FramePool(16).open() as pool, BlockFile.open(path, write=True, direct=True) as f:
            layout = pool.write(f, memoryview(raw.numpy()), Zstd())
    """

    def __init__(self, n_threads: int = ZSTD_THREADS) -> None:
        if n_threads < 1:
            raise ValueError(f"n_threads={n_threads} must be >= 1")
        self.n_threads = n_threads
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()

    def open(self) -> FramePool:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.n_threads, thread_name_prefix="zo2tier-zstd")
        return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- whole blocks -----------------------------------------------------------------------------
    def read(self, f: BlockFile, layout: FrameLayout, dst: memoryview, *, verify: bool = True,
             offset: int = 0, what: str = "block") -> None:
        """Fill ``dst`` (the block's uncompressed bytes) from the frames of ``layout`` in ``f``."""
        if self._pool is None:
            raise RuntimeError("FramePool.read before open()")
        if -(-len(dst) // layout.frame_bytes) != len(layout.frames):
            raise ValueError(f"{what}: a buffer of {len(dst)} bytes does not match {len(layout.frames)} zstd frames "
                             f"of {layout.frame_bytes} bytes; pass a buffer of the block's nbytes")
        _wait_all([self._pool.submit(self._read_frame, f, layout, k, dst, verify, offset, what)
                   for k in range(len(layout.frames))])

    def write(self, f: BlockFile, src: memoryview, spec: Zstd, *, what: str = "block") -> FrameLayout:
        """Compress ``src`` into ``f`` (a new, empty file) as frames; returns their layout."""
        if self._pool is None:
            raise RuntimeError("FramePool.write before open()")
        fb = spec.frame_bytes
        tasks = [self._pool.submit(self.write_frame, f, k, src[s : s + fb], spec, what)
                 for k, s in enumerate(range(0, max(len(src), 1), fb))]
        return FrameLayout(spec.level, fb, tuple(_wait_all(tasks)))

    def write_stream(self, f: BlockFile, pieces: Iterable[memoryview], spec: Zstd, *,
                     what: str = "block") -> tuple[FrameLayout, int]:
        """Like :meth:`write` from byte pieces in order, holding at most 2 frames per thread; returns
        (layout, uncompressed bytes)."""
        if self._pool is None:
            raise RuntimeError("FramePool.write_stream before open()")
        fb, inflight, frames, total = spec.frame_bytes, [], [], 0
        frame, used = bytearray(fb), 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            total += len(view)
            while view:
                take = min(len(view), fb - used)
                frame[used : used + take] = view[:take]
                used, view = used + take, view[take:]
                if used == fb:
                    inflight.append(self._pool.submit(self.write_frame, f, len(inflight) + len(frames),
                                                      memoryview(frame), spec, what))
                    frame, used = bytearray(fb), 0
                    if len(inflight) >= 2 * self.n_threads:
                        frames.append(inflight.pop(0).result())
        if used or not (frames or inflight):
            inflight.append(self._pool.submit(self.write_frame, f, len(inflight) + len(frames),
                                              memoryview(frame)[:used], spec, what))
        frames.extend(_wait_all(inflight))
        return FrameLayout(spec.level, fb, tuple(frames)), total

    # ---- one frame, on a pool thread --------------------------------------------------------------
    def write_frame(self, f: BlockFile, k: int, src: memoryview, spec: Zstd, what: str = "block") -> tuple[int, str]:
        """Compress ``src`` as frame ``k`` and write it, padded, at its slot; returns (length, xxh3_64)."""
        blob = self._compressor(spec.level).compress(src)
        n = len(blob)
        scratch = self._scratch(align_up(n))
        scratch[:n] = blob
        scratch[n : align_up(n)] = bytes(align_up(n) - n)
        f.write_from(self._local.tensor, align_up(n), offset=k * slot_bytes(spec.frame_bytes), what=f"{what}, zstd frame {k}")
        return n, checksum(scratch[:n])

    def _read_frame(self, f: BlockFile, layout: FrameLayout, k: int, dst: memoryview, verify: bool,
                    offset: int, what: str) -> None:
        n, digest = layout.frames[k]
        self._scratch(align_up(n))
        f.read_into(self._local.tensor, align_up(n), offset=offset + k * layout.slot_bytes,
                    what=f"{what}, zstd frame {k}")
        blob = self._local.view[:n]
        if verify and checksum(blob) != digest:
            raise FrameCorruptError(k, f"fails its checksum (xxh3_64 {checksum(blob)}, manifest says {digest})")
        start = k * layout.frame_bytes
        out = dst[start : min(start + layout.frame_bytes, len(dst))]
        got = 0
        try:
            reader = self._decompressor().stream_reader(blob)
            while got < len(out):
                step = reader.readinto(out[got:])
                if step == 0:
                    break
                got += step
        except zstandard.ZstdError as exc:
            raise FrameCorruptError(k, f"does not decompress ({exc})") from None
        if got != len(out):
            raise FrameCorruptError(k, f"decompresses to {got} bytes, {len(out)} expected")

    def _scratch(self, n_bytes: int) -> memoryview:
        """This thread's 4 KiB-aligned buffer of at least ``n_bytes`` (grown when a larger frame comes)."""
        if getattr(self._local, "tensor", None) is None or self._local.tensor.numel() < n_bytes:
            self._local.tensor = aligned_empty(max(n_bytes, align_up(ZSTD_FRAME_BYTES)))
            self._local.view = memoryview(self._local.tensor.numpy())
        return self._local.view

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        cache = self._local.__dict__.setdefault("compressors", {})
        if level not in cache:
            cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return cache[level]

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        if getattr(self._local, "dctx", None) is None:
            self._local.dctx = zstandard.ZstdDecompressor()
        return self._local.dctx


def _wait_all(futures: list) -> list:
    """Every result in order; on failure wait for the rest (they use the caller's buffers) and raise the first."""
    results, first = [], None
    for fut in futures:
        try:
            results.append(fut.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others have finished
            first = first or exc
    if first is not None:
        raise first
    return results


__all__ = ["DEFAULT_DISK_COMPRESS", "FrameCorruptError", "FramePool", "Zstd", "parse_compress"]
