"""Aligned block I/O: O_DIRECT reads and writes into caller-given buffers, with a clean buffered fallback.

This module moves bytes and does no math. Offsets and lengths are multiples of :data:`ALIGN_BYTES`;
buffers come from :func:`aligned_empty`, so O_DIRECT's address rule holds too. A file whose length is not
a multiple of 4 KiB is read in full: the aligned body through O_DIRECT, the tail through a buffered
descriptor, so no final partial chunk is ever dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

ALIGN_BYTES = 4096
READ_RETRIES = 3
_log = logging.getLogger(__name__)


class BlockIOError(OSError):
    """A block could not be read or written; the message names the block, the file and the fix."""


def align_up(n_bytes: int, align: int = ALIGN_BYTES) -> int:
    """Round ``n_bytes`` up to a multiple of ``align``."""
    return (n_bytes + align - 1) // align * align


def aligned_empty(n_bytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 tensor of ``align_up(n_bytes)`` bytes whose address is 4 KiB-aligned.

    ``pin=True`` page-locks it (falls back to pageable memory, with one warning, if pinning fails).
    """
    size = align_up(max(n_bytes, 1))
    raw = _alloc(size + ALIGN_BYTES, pin)
    shift = (-raw.data_ptr()) % ALIGN_BYTES
    return raw[shift : shift + size]


_pin_warned = False


def _pin_alloc(n_bytes: int) -> torch.Tensor:
    """Page-locked uint8 memory; raises RuntimeError when the pinned-memory limit is reached.

    torch's pinned allocator rounds every request up to a power of two, so callers ask for powers of two
    (see :class:`PinnedPool`) to lock no more than they use.
    """
    return torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)


def _register_alloc(n_bytes: int) -> torch.Tensor:
    """``n_bytes`` (a multiple of 4 KiB) of page-aligned host memory page-locked in place with
    ``cudaHostRegister``: exactly that size, where torch's pinned allocator would round up to a power of two.
    Raises RuntimeError when it cannot be locked. :func:`unregister` unlocks it."""
    raw = torch.empty(n_bytes + ALIGN_BYTES, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % ALIGN_BYTES
    buf = raw[shift : shift + n_bytes]
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), n_bytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {n_bytes} bytes failed (cudaError {int(err)})")
    return buf


def unregister(buf: torch.Tensor) -> None:
    """Unlock memory locked by :func:`_register_alloc` (before it is freed)."""
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


def _alloc(n_bytes: int, pin: bool) -> torch.Tensor:
    global _pin_warned
    if pin:
        try:
            return _pin_alloc(n_bytes)
        except RuntimeError as exc:  # pinned-memory limit (ulimit -l, cgroup) reached
            if not _pin_warned:
                _log.warning("could not pin %d bytes (%s); using pageable host memory", n_bytes, exc)
                _pin_warned = True
    return torch.empty(n_bytes, dtype=torch.uint8)


class PinnedPool:
    """Aligned host buffers carved out of page-locked chunks, degrading instead of crashing.

    Pinning one large chunk can fail (``ulimit -l``, a cgroup limit, fragmentation) where smaller chunks
    succeed. When it does, the chunk size is halved, down to the size of the buffer asked for; if even that
    fails, the pool hands out pageable memory from then on and logs one warning. Construction allocates
    nothing.

    Example::

        pool = PinnedPool(pin=True, chunk_bytes=6 * block_bytes)
        staging = [pool.take(block_bytes) for _ in range(6)]   # one pinned chunk if the limit allows
    """

    def __init__(self, *, pin: bool, chunk_bytes: int = 2**30, total_bytes: int | None = None,
                 exact: bool = False) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be > 0")
        self.pin = pin
        # exact: chunks are whole multiples of the buffer asked for, locked in place with cudaHostRegister
        # (no power-of-two rounding, no tail a chunk cannot use); close() unlocks them
        self.exact = exact
        self._registered: list[torch.Tensor] = []
        self.chunk_bytes = align_up(chunk_bytes)
        self.total_bytes = total_bytes  # what the caller will take in all: the last chunk is sized to it
        self.pinned_bytes = 0  # bytes of pinned chunks allocated
        self.pageable_bytes = 0  # bytes handed out unpinned
        self._chunk: torch.Tensor | None = None
        self._used = 0

    def take(self, n_bytes: int) -> torch.Tensor:
        """A 4 KiB-aligned uint8 buffer of ``align_up(n_bytes)`` bytes, pinned if the limit allows."""
        size = align_up(max(n_bytes, 1))
        if self.pin and (self._chunk is None or self._used + size > self._chunk.numel()):
            self._chunk, self._used = self._new_chunk(size), 0
        if not self.pin:
            self.pageable_bytes += size
            return aligned_empty(size)
        view = self._chunk[self._used : self._used + size]
        self._used += size
        return view

    def _new_chunk(self, size: int) -> torch.Tensor | None:
        chunk = max(self.chunk_bytes, size)
        if self.exact:  # as many whole buffers as fit, never more than is still to come
            chunk = max(size, chunk // size * size)
            if self.total_bytes is not None:
                chunk = max(size, min(chunk, align_up(self.total_bytes - self.pinned_bytes)))
        elif self.total_bytes is not None:  # the smallest power of two that covers what is still to come
            left = max(size, self.total_bytes - self.pinned_bytes)
            chunk = max(size, min(chunk, 1 << (left - 1).bit_length()))
        while True:
            try:
                if self.exact:
                    raw = _register_alloc(chunk)
                    self._registered.append(raw)
                else:
                    raw = _pin_alloc(chunk)  # pinned memory is page-aligned: no slack needed
            except RuntimeError as exc:  # pinned-memory limit reached: try half as much
                if chunk > size:
                    chunk = max(size, align_up(chunk // 2))
                    continue
                _log.warning("could not pin %d bytes (%s); staging buffers use pageable host memory from now "
                             "on (slower copies; raise 'ulimit -l' or the container's locked-memory limit)",
                             chunk, exc)
                self.pin = False
                return None
            self.chunk_bytes = chunk  # later chunks start from the size that worked
            self.pinned_bytes += chunk
            if raw.data_ptr() % ALIGN_BYTES:  # not page-aligned after all: give up the first page
                raw = raw[(-raw.data_ptr()) % ALIGN_BYTES :]
                chunk = raw.numel() // ALIGN_BYTES * ALIGN_BYTES
            return raw[:chunk]

    def close(self) -> None:
        """Unlock the chunks locked with cudaHostRegister (the buffers taken must no longer be in use)."""
        while self._registered:
            unregister(self._registered.pop())


def supports_direct_io(directory: str) -> bool:
    """True if files in ``directory`` can be opened with O_DIRECT (False on tmpfs and non-Linux)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = os.path.join(directory, f".zo2tier-odirect-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | flag, 0o600)
    except OSError:
        return False
    try:
        buf = aligned_empty(ALIGN_BYTES)
        os.pwritev(fd, [memoryview(buf.numpy())], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


@dataclass
class BlockFile:
    """One block file, opened for aligned I/O. Use as a context manager or call :meth:`close`."""

    path: str
    direct: bool
    _fd: int = -1

    @classmethod
    def open(cls, path: str, *, write: bool, direct: bool) -> BlockFile:
        flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
        use_direct = direct and bool(getattr(os, "O_DIRECT", 0))
        if use_direct:
            try:
                return cls(path, True, os.open(path, flags | os.O_DIRECT, 0o644))
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return cls(path, False, os.open(path, flags, 0o644))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size_bytes(self) -> int:
        """The file's current size."""
        return os.fstat(self._fd).st_size

    def read_into(self, buf: torch.Tensor, n_bytes: int, *, offset: int = 0, what: str = "block") -> None:
        """Fill ``buf[:n_bytes]`` from the file at ``offset`` (aligned); retries short reads and EIO."""
        size = os.fstat(self._fd).st_size
        if size < offset + n_bytes:
            raise BlockIOError(
                errno.EIO,
                f"{what} file {self.path} is truncated: it has {size} bytes, {offset + n_bytes} expected; "
                "restore the store from a checkpoint (or rebuild it from the model)",
            )
        body = n_bytes - n_bytes % ALIGN_BYTES if self.direct else n_bytes
        _read_full(self._fd, buf, 0, body, offset, self.path, what)
        if body < n_bytes:  # unaligned tail: a buffered descriptor reads it
            fd = os.open(self.path, os.O_RDONLY)
            try:
                _read_full(fd, buf, body, n_bytes - body, offset + body, self.path, what)
            finally:
                os.close(fd)

    def write_from(self, buf: torch.Tensor, n_bytes: int, *, offset: int = 0, what: str = "block") -> None:
        """Write ``buf[:align_up(n_bytes)]`` at ``offset``; the padding beyond ``n_bytes`` is written too."""
        length = align_up(n_bytes) if self.direct else n_bytes
        view = memoryview(buf.numpy())
        done = 0
        while done < length:
            try:
                wrote = os.pwritev(self._fd, [view[done:length]], offset + done)
            except OSError as exc:
                raise_if_no_space(exc, what, self.path, length, done)
                raise
            if wrote <= 0:
                raise BlockIOError(errno.EIO, f"writing {what} to {self.path} made no progress")
            done += wrote

    def sync(self, *, what: str = "block", n_bytes: int = 0) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:  # delayed allocation: some file systems report a full disk only here
            raise_if_no_space(exc, what, self.path, n_bytes, 0)
            raise

    def truncate(self, n_bytes: int) -> None:
        os.ftruncate(self._fd, n_bytes)


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


def raise_if_no_space(exc: OSError, what: str, path: str, n_bytes: int, done: int) -> None:
    """Re-raise a full-disk/quota/file-size error of writing ``path`` as a BlockIOError naming the bytes."""
    if exc.errno in _NO_SPACE:
        raise BlockIOError(
            exc.errno,
            f"cannot write {what} to {path} ({exc.strerror}): it needs {n_bytes} bytes, {n_bytes - done} more "
            f"than were written; free at least {n_bytes} bytes in {os.path.dirname(path) or '.'} (or raise the "
            "file-size limit) and resume: the store still holds its last good copy",
        ) from exc


def _read_full(fd: int, buf: torch.Tensor, start: int, n_bytes: int, offset: int, path: str, what: str) -> None:
    view = memoryview(buf.numpy())
    done, failures = 0, 0
    while done < n_bytes:
        try:
            got = os.preadv(fd, [view[start + done : start + n_bytes]], offset + done)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            got = -1
        if got > 0:
            done += got
            continue
        failures += 1
        _log.warning("reading %s from %s: %s at byte %d of %d (attempt %d of %d)", what, path,
                     "EIO" if got < 0 else "short read", done, n_bytes, failures, READ_RETRIES + 1)
        if failures > READ_RETRIES:
            raise BlockIOError(
                errno.EIO,
                f"reading {what} from {path} failed after {READ_RETRIES} retries "
                f"({done} of {n_bytes} bytes read at offset {offset}); the file is truncated or the drive "
                "is failing: check the disk, or restore the store from a checkpoint",
            )
        time.sleep(0.01 * failures)
