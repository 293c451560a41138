"""One owner at a time per store directory.

Between processes: an ``flock`` on ``.zo2tier.lock``, which the kernel drops when its process dies.

Within one process the flock cannot tell owners apart, so the process keeps a record per directory of the
roles held on it. An engine that trains on a directory holds two: ``"disk tier"``
(zo2tier.tiers.store_dir.claim_disk_dir) and ``"store"`` (an open zo2tier.store.blockstore.BlockStore, the
one the engine keeps in step with its disk tier). A role that is already held means a second engine, or a
second open store, on a live directory, whose commits would delete the first one's files: it is refused
with StoreLockedError. The third role, ``"base"``, is a read-only user: the base store of fine-tunes that
leave it unchanged (their changed blocks go to their own overlay stores). It is locked *shared*, with other
processes and other engines of this one, and never together with a writing role. The flock goes when the
last role (or the last base reader) is released.
"""

from __future__ import annotations

import fcntl
import os
import threading
from dataclasses import dataclass, field

MARKER = ".zo2tier-disk"
LOCK = ".zo2tier.lock"
ROLES = ("disk tier", "store", "base")

_FIX = {
    "disk tier": "close that engine first (engine.close(), or leave its `with` block), or give this one another disk_dir",
    "store": "close the engine or store that has it open first (engine.close(), store.close()), or use another "
             "directory (for a read-only look, BlockStore.open(path, lock=False))",
    "base": "close the engine that changes it first, or fine-tune from it without --in-place",
}


@dataclass
class _Held:
    fd: int
    shared: bool  # held as a base (flock shared); else in writing roles (flock exclusive)
    roles: set[str] = field(default_factory=set)
    readers: int = 0  # base holds


_held: dict[str, _Held] = {}  # absolute path -> this process's flock on it and the roles it is held in
_guard = threading.Lock()


class StoreLockedError(RuntimeError):
    """Another live owner holds the store (another process, or another engine in this one); the message
    names the directory and the fix."""


def lock_dir(path: str, *, role: str) -> None:
    """Take this process's lock on directory ``path`` in ``role`` (one of :data:`ROLES`): exclusive for
    ``"disk tier"`` and ``"store"``, shared for ``"base"``.

    Raises StoreLockedError if another process holds the directory in a way that excludes ``role``, or this
    process already holds it in ``role`` (a writing role), or holds it as a base while ``role`` writes (or
    the other way round). Example: an engine claims its disk_dir as ``"disk tier"`` and opens the store there
    as ``"store"``; a second engine on the same disk_dir is refused at its ``"disk tier"`` claim.
    """
    if role not in ROLES:
        raise ValueError(f"lock role {role!r} is unknown; use one of {ROLES}")
    shared = role == "base"
    path = os.path.abspath(path)
    with _guard:
        held = _held.get(path)
        if held is not None:
            if held.shared != shared:
                what = "read as the base of a fine-tune" if held.shared else "being changed by an engine"
                raise StoreLockedError(f"{path!r} is {what} in this process, so it cannot also be used as a "
                                       f"{role}; {_FIX[role]}")
            if shared:
                held.readers += 1
                return
            if role in held.roles:
                raise StoreLockedError(f"{path!r} is already in use as a {role} in this process (by another "
                                       f"ZOEngine or store that is still open); {_FIX[role]}")
            held.roles.add(role)
            return
        fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            why = "is being changed by another zo2tier process" if shared else "is in use by another zo2tier process"
            raise StoreLockedError(
                f"store {path!r} {why} (pid {holder}); wait for it to finish or use another directory"
                + ("" if shared else " (fine-tunes that leave a store unchanged may share it; --in-place may not)")
            ) from None
        if not shared:  # the exclusive holder names itself for the error above
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held[path] = _Held(fd, shared, set() if shared else {role}, 1 if shared else 0)


def unlock_dir(path: str, *, role: str) -> None:
    """Release ``role`` on ``path`` (nothing if it is not held); the flock goes with the last holder."""
    path = os.path.abspath(path)
    with _guard:
        held = _held.get(path)
        if held is None or (role == "base") != held.shared:
            return
        if held.shared:
            held.readers -= 1
        elif role in held.roles:
            held.roles.discard(role)
        else:
            return
        if not held.roles and held.readers <= 0:
            del _held[path]
            fcntl.flock(held.fd, fcntl.LOCK_UN)
            os.close(held.fd)
