"""One disk tier for every data-parallel rank: a shared read-only base, per-rank update logs, consolidation.

With ``DataParallel(shared_disk=True)`` every rank of the group uses the same ``disk_dir`` (no ``rank{r}``
suffix). Rank 0 of the group, the *owner*, builds the store there exactly as a single process would
(locked, every block written once) while the other ranks, the *followers*, wait in one all-gather; the
followers then point their disk blocks at the files the owner's committed manifest names. Followers never
lock, write or delete anything in ``disk_dir``.

During training no rank writes a disk block: its pending updates stay in the update log, which is
bit-identical on every rank (``zo2tier/distributed.py``), and are replayed on every arrival, as between
write-backs with own directories. Consolidation bounds that replay. At the start of a step where some disk
block has ``min(write_back_every["disk"], max_log)`` updates pending, and in ``flush()``/``close()``:

1. every rank settles its reads in flight; barrier. From here no rank reads the shared files.
2. the owner replays each pending disk block, writes it as a *new* generation file
   (``block_<i>_g<g+1>.bin``: ``.tmp``, fsync, rename; a file another rank may read is never overwritten),
   and commits the manifest, which now names the new files (the commit deletes the old ones);
3. an all-gather (the second barrier, carrying the owner's error if the write failed); each follower
   re-reads the manifest, points its records at the new files and marks them applied.

Every rank holds the same log and the same weights, so the owner's file is bit for bit the copy each rank
would have written for itself. With fp32 storage the weights do not even depend on when a block is written
back (replay from an older fp32 copy is the same sequence of fp32 operations), so a shared-disk run equals
an own-directory run exactly. Narrow storage (bf16/fp16/int8) rounds at each write and own directories
write each block at staggered steps, so the two modes then agree only to that rounding; the ranks of one
run stay bit-identical either way.

Trade-off against own directories (``docs/scaling.md``, "Shared disk tier"): one copy of the store on the
node instead of N, and one writer instead of N (the disk's write bandwidth is not split); with buffered
reads the OS page cache would hold one copy for all ranks, but the engine reads with ``O_DIRECT``, so each
rank still reads its bytes from the drive. In exchange every disk block replays up to C pending updates per
visit (one RNG pass each, C = the consolidation interval) and every C steps the followers wait while the
owner rewrites all disk blocks at once, instead of write-backs spread over the steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from zo2tier.checkpoint import commit_store
from zo2tier.distributed import ReplicaDivergenceError
from zo2tier.store.format import read_manifest
from zo2tier.tiers.store_dir import claim_disk_dir, release_disk_dir

__all__ = ["OwnDisk", "SharedDisk", "policy_for"]


class OwnDisk:
    """This process owns its disk directory: it locks it, writes its blocks, and commits its store."""

    follower = False  # True: reads another process's store and never writes it
    keep_disk = False  # True: disk blocks are not written back during training (consolidated instead)

    def claim(self, disk_dir: str) -> str:
        return claim_disk_dir(disk_dir)

    def release(self, disk_dir: str) -> None:
        release_disk_dir(disk_dir)

    @contextmanager
    def building(self, engine: Any) -> Iterator[None]:
        yield

    def built(self, engine: Any) -> None:
        return None

    def before_step(self, engine: Any) -> None:
        return None

    def flushed(self, engine: Any) -> None:
        return None


class SharedDisk(OwnDisk):
    """Every data-parallel rank reads one disk tier; rank 0 (the owner) writes it (module docstring)."""

    keep_disk = True

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas
        self.follower = replicas.rank != 0

    def claim(self, disk_dir: str) -> str:
        return os.path.abspath(disk_dir) if self.follower else claim_disk_dir(disk_dir)

    def release(self, disk_dir: str) -> None:
        if not self.follower:
            release_disk_dir(disk_dir)

    @contextmanager
    def building(self, engine: Any) -> Iterator[None]:
        """Followers wait until the owner has written and committed the store.

        The wait is one all-gather of (disk_dir, disk blocks, disk storage, the owner's error), so every rank
        also checks that they agree, and a failed build on the owner raises on every rank instead of hanging.
        """
        mine = {"disk_dir": engine.disk_dir, "disk_blocks": [b for b, t in engine.placement.items() if t == "disk"],
                "storage": engine.storage["disk"], "error": None}
        if self.follower:
            _agree(self.replicas.gather_object(mine))
            yield
            return
        try:
            yield
        except BaseException as exc:
            self.replicas.gather_object({**mine, "error": f"{type(exc).__name__}: {exc}"})
            raise
        _agree(self.replicas.gather_object(mine))

    def built(self, engine: Any) -> None:
        if self.follower:
            follow(engine)

    def before_step(self, engine: Any) -> None:
        """Consolidate when some disk block has the write-back limit of updates pending; the same on every rank."""
        disk = engine.table.by_tier("disk")
        if disk and len(engine.log) - min(r.applied_steps for r in disk) >= engine.runner.schedule.log_limit("disk"):
            consolidate(engine, self)

    def flushed(self, engine: Any) -> None:
        consolidate(engine, self)


def policy_for(collective: Any, needs_disk: bool, compress: Any) -> OwnDisk:
    """The store-ownership policy of an engine: its own directory, or a data-parallel group's shared one."""
    spec = getattr(collective, "spec", None)
    if not (needs_disk and spec is not None and spec.shared_disk):
        return OwnDisk()
    if compress is not None:
        raise ValueError("compress='zstd' with DataParallel(shared_disk=True) is not supported yet; "
                         "drop one of them (compress=None, or shared_disk=False: each rank its own copy)")
    return SharedDisk(collective)


def _agree(everyone: list[dict]) -> None:
    owner = everyone[0]
    if owner["error"] is not None:
        raise RuntimeError(f"rank 0 failed to write the shared disk tier in {owner['disk_dir']}: {owner['error']}")
    for r, other in enumerate(everyone):
        for key in ("disk_dir", "disk_blocks", "storage"):
            if other[key] != owner[key]:
                raise ValueError(
                    f"DataParallel(shared_disk=True): rank {r} has {key} {other[key]!r} but rank 0 has "
                    f"{owner[key]!r}; every rank must pass the same disk_dir, placement and disk storage "
                    "(or use shared_disk=False: each rank its own directory)"
                )


def follow(engine: Any) -> None:
    """Point a follower's disk blocks at the files named by the owner's committed manifest."""
    manifest = read_manifest(engine.disk_dir)
    for record in engine.table.by_tier("disk"):
        entry = manifest.blocks[record.index] if record.index < len(manifest.blocks) else None
        if entry is None or entry.name != record.name or entry.dtype != record.storage or entry.file is None:
            raise ValueError(
                f"the shared store {engine.disk_dir} does not hold block {record.name} as {record.storage} "
                f"(manifest: {entry and (entry.name, entry.dtype, entry.file)}); every rank must build the "
                "same model with the same placement and storage"
            )
        record.path = os.path.join(engine.disk_dir, entry.file)
        engine.table.mark_applied(record, entry.applied_steps)


def consolidate(engine: Any, policy: SharedDisk) -> None:
    """Fold every pending update into the shared disk files (module docstring); every rank must call it."""
    dp, step = policy.replicas, len(engine.log)
    pending = [r for r in engine.table.by_tier("disk") if r.applied_steps < step]
    if not pending:
        return
    engine.tiers.drain()
    dp.barrier()  # no rank reads the shared files until the all-gather below
    error = None
    if not policy.follower:
        try:
            for record in pending:
                engine.runner.write_back(record, engine.runner.materialize(record, scratch=engine.runner.work))
            engine.tiers.drain()  # the new files are written; their records are applied
            for record in pending:
                engine.store.set_applied(record.index, record.applied_steps)
            commit_store(engine)
        except Exception as exc:  # noqa: BLE001 (told to the followers, then raised here)
            error = exc
    status = dp.gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"rank 0 failed to consolidate the shared disk tier in {engine.disk_dir}: {status[0]}; "
                           "the updates are still in every rank's log")
    if policy.follower:
        follow(engine)
        behind = [r.name for r in pending if r.applied_steps != step]
        if behind:
            raise ReplicaDivergenceError(f"after consolidation the shared store holds blocks {behind} at fewer "
                                         f"than this rank's {step} updates; the ranks' logs differ")
    dp.n_consolidations += 1
