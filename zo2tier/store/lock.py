"""One process at a time per store directory: an ``flock`` the kernel drops when its process dies.

A store read by fine-tunes that leave it unchanged (their changed blocks go to their own stores) is locked
*shared*: several such processes may read it at once, and none may while one holds it exclusively.

Within one process the lock is counted: the engine's disk tier and the store it writes may both hold it,
and it is released when the last holder lets go.
"""

from __future__ import annotations

import fcntl
import os
import threading

MARKER = ".zo2tier-disk"
LOCK = ".zo2tier.lock"

_held: dict[str, list[int]] = {}  # absolute path -> [fd, holders]
_guard = threading.Lock()


class StoreLockedError(RuntimeError):
    """Another live process holds the store; the message names it."""


def lock_dir(path: str, *, shared: bool = False) -> None:
    """Take (or count once more) this process's lock on directory ``path``: exclusive, or ``shared`` with
    other readers. Within one process the first hold decides the kind."""
    path = os.path.abspath(path)
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return
        fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            why = ("is being changed by another zo2tier process" if shared else
                   "is in use by another zo2tier process")
            raise StoreLockedError(
                f"store {path!r} {why} (pid {holder}); wait for it to finish or use another directory"
                + ("" if shared else " (fine-tunes that leave a store unchanged may share it; --in-place may not)")
            ) from None
        if not shared:  # the exclusive holder names itself for the error above
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held[path] = [fd, 1]


def unlock_dir(path: str) -> None:
    """Drop one hold on ``path``; the flock goes with the last one."""
    path = os.path.abspath(path)
    with _guard:
        held = _held.get(path)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _held[path]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])
