"""The disk tier's directory: claimed once, checked before any work, locked against a second owner."""

from __future__ import annotations

import json
import os
import time

from zo2tier.store.lock import MARKER, StoreLockedError, lock_dir, unlock_dir  # noqa: F401 (re-exported)

_OWN_PREFIXES = ("block_", ".zo2tier", "manifest", "hf")  # hf/: a store's tokenizer and config (zo2tier.model_ref)


def claim_disk_dir(path: str) -> str:
    """Create (if needed), check and lock ``path`` for the disk tier; return its absolute path.

    Refuses a directory holding files zo2tier did not write, one it cannot write, one another process has
    locked, and one that is already the disk tier of a live engine in this process (StoreLockedError).
    Files of an earlier zo2tier run in the same directory are reused (overwritten). The lock is an
    ``flock``: the kernel drops it when its process dies, so a stale lock never blocks.
    """
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"disk_dir {path!r} cannot be created ({exc.strerror}); pick a writable directory") from exc
    if not os.path.isdir(path):
        raise ValueError(f"disk_dir {path!r} is not a directory; pick a directory for the disk tier")
    if not os.access(path, os.W_OK | os.X_OK | os.R_OK, effective_ids=os.access in os.supports_effective_ids):
        raise ValueError(f"disk_dir {path!r} is not readable and writable by this user; fix its permissions or pick another")
    entries = os.listdir(path)
    foreign = [e for e in entries if not e.startswith(_OWN_PREFIXES)]
    if foreign or (entries and MARKER not in entries):
        shown = ", ".join(sorted(foreign or entries)[:3])
        raise ValueError(
            f"disk_dir {path!r} already holds files zo2tier did not write ({shown}); "
            "give an empty or new directory (zo2tier never deletes files it did not create)"
        )
    try:
        _lock(path)
    except OSError as exc:  # e.g. a lock file left by another user, which this one cannot open
        raise ValueError(
            f"disk_dir {path!r}: its lock file cannot be opened ({exc.strerror}: {exc.filename}); "
            "fix its owner/permissions or pick another directory"
        ) from exc
    try:
        probe = os.path.join(path, MARKER)
        with open(probe, "w") as f:
            json.dump({"created_by": "zo2tier", "pid": os.getpid(), "time": time.time()}, f)
    except OSError as exc:
        raise ValueError(f"disk_dir {path!r} is not writable ({exc.strerror}); fix its permissions or pick another") from exc
    return path


def _lock(path: str) -> None:
    lock_dir(path, role="disk tier")  # the store owns locking (zo2tier/store/lock.py)


def release_disk_dir(path: str) -> None:
    """Release this process's disk-tier claim on ``path`` (called by ``ZOEngine.close``)."""
    unlock_dir(path, role="disk tier")
