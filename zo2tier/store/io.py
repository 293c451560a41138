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

import torch

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


def _alloc(n_bytes: int, pin: bool) -> torch.Tensor:
    global _pin_warned
    if pin:
        try:
            return torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:  # pinned-memory limit (ulimit -l, cgroup) reached
            if not _pin_warned:
                _log.warning("could not pin %d bytes (%s); using pageable host memory", n_bytes, exc)
                _pin_warned = True
    return torch.empty(n_bytes, dtype=torch.uint8)


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
    def open(cls, path: str, *, write: bool, direct: bool) -> "BlockFile":
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

    def __enter__(self) -> "BlockFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_into(self, buf: torch.Tensor, n_bytes: int, *, offset: int = 0, what: str = "block") -> None:
        """Fill ``buf[:n_bytes]`` from the file at ``offset`` (aligned); retries short reads and EIO."""
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
                if exc.errno == errno.ENOSPC or exc.errno == errno.EFBIG:
                    raise BlockIOError(
                        exc.errno,
                        f"no space to write {what} to {self.path}: {length - done} more bytes needed; "
                        "free disk space (or lower the disk budget) and resume",
                    ) from exc
                raise
            if wrote <= 0:
                raise BlockIOError(errno.EIO, f"writing {what} to {self.path} made no progress")
            done += wrote

    def sync(self) -> None:
        os.fsync(self._fd)

    def truncate(self, n_bytes: int) -> None:
        os.ftruncate(self._fd, n_bytes)


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
        if failures > READ_RETRIES:
            raise BlockIOError(
                errno.EIO,
                f"reading {what} from {path} failed after {READ_RETRIES} retries "
                f"({done} of {n_bytes} bytes read at offset {offset}); the file is truncated or the drive "
                "is failing: check the disk, or restore the store from a checkpoint",
            )
        time.sleep(0.01 * failures)
