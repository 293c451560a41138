"""Data-parallel tiered MeZO over ``torch.distributed``: only a few scalars per sample cross the network.

Every rank holds a full replica of the weights in its own tiers (its own budget, plan, disk directory and
prefetcher; or, with ``DataParallel(shared_disk=True)``, one disk directory read by all ranks and written by
rank 0 only: ``zo2tier/shared_disk.py``). Per step:

1. each rank takes its contiguous shard of the global batch (rank r gets rows ``[start_r, stop_r)``)
   and runs the dual forward on it with the perturbation of index ``r % q``;
2. it computes, per sample, the sum of next-token losses under θ+εz and θ−εz and the token count;
3. these ``(B_r, 3)`` float64 rows are all-gathered, so every rank holds the same global table in
   global-batch order, and computes from it, with the same arithmetic, the token-weighted means
   ``L±_k`` and the estimates ``g_k = (L+_k − L−_k) / 2ε`` (``math.fsum``: correctly rounded, so the
   result does not even depend on the order);
4. every rank appends the same log entries, so every replica replays the same update.

With ``n_perturbations=q`` (``1 <= q <= world size``), rank r evaluates perturbation ``k = r % q`` on its
shard. ``g_k`` uses only the samples of the ranks with ``r % q == k``. A step then appends **q log
entries**, entry ``t + k`` holding ``(step_seed(seed, t + k), g_k, lr / q, weight_decay)``, so the log
stays a plain list of ``(seed, g)`` pairs whose sequential replay is exact everywhere. The update is
``θ ← θ − (lr/q)·Σ_k (g_k·z_k + wd·θ)`` applied entry by entry. With q > 1, ``len(engine.log)`` counts
perturbations, not steps.

Consistency guard: before every ``check_every``-th step (step 0 included) each rank hashes the clean
fp32 weights of every block (all logged updates applied) and the update log; the hashes are
all-gathered and the first block that differs raises :class:`ReplicaDivergenceError` on every rank.

What is exact: across the ranks of one run, logs and weights are bit-identical by construction. Against a
one-process run of the same global batch, g is bit-identical whenever the per-sample losses are, but the
forward's matrix products see a different batch size per rank and may round differently, so the
per-sample losses (and through them g and the weights) agree only to fp32 rounding; ``docs/scaling.md``
states the tolerance.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from zo2tier.batch import unpack
from zo2tier.zo.estimators import Group
from zo2tier.zo.update import next_token_log_probs

_log = logging.getLogger(__name__)

__all__ = [
    "DataParallel",
    "ReplicaDivergenceError",
    "check_replicas",
    "per_sample_token_losses",
    "reduce_rows",
    "shard_rows",
]

_P = 2**31 - 1  # Mersenne prime modulus of the weight checksum
_A, _B = 1103515245, 12345  # position multipliers m_i = 1 + (A·i + B) mod (P − 1), never 0 mod P
_HASH_CHUNK = 1 << 22


class ReplicaDivergenceError(RuntimeError):
    """The ranks' weights (or update logs) differ; the message names the first diverging block."""


@dataclass(frozen=True)
class DataParallel:
    """How a :class:`~zo2tier.ZOEngine` runs data-parallel over a ``torch.distributed`` process group.

    ``group``: the process group (None: the default WORLD group). ``n_perturbations``: q perturbations
    per step across ranks, rank r evaluating index ``r % q``. ``check_every``: run the consistency guard
    before every M-th step (0: never). ``shard_batch``: True if ``step`` receives the global batch and
    the engine takes its own contiguous shard; False if each rank already passes its own shard.

    ``shared_disk``: False (default): each rank keeps its own full copy of the disk tier in
    ``disk_dir/rank{r}``. True: every rank reads the disk blocks from ONE set of files in ``disk_dir``
    itself, written by rank 0 of the group; no rank writes them during training, each keeps the disk
    blocks' updates in its (bit-identical) update log, and all ranks consolidate them together once a block
    has ``write_back_every["disk"]`` (or ``max_log``) updates pending (``zo2tier/shared_disk.py``). One copy
    on disk instead of N, one writer instead of N, for a replay cost between consolidations. Every rank
    must pass the same ``disk_dir`` (one node, or a shared filesystem) and placement, and call
    ``flush()``/``close()`` together; ``save_checkpoint`` runs on rank 0 only.

    Example::

        dist.init_process_group("nccl")  # e.g. under torchrun
        engine = ZOEngine(model, budget=..., disk_dir="runs/disk",  # the engine uses runs/disk/rank{r}
                          data_parallel=DataParallel(n_perturbations=2, check_every=100))
        engine = ZOEngine(model, budget=..., disk_dir="runs/disk",  # every rank reads runs/disk
                          data_parallel=DataParallel(shared_disk=True))
    """

    group: Any = None
    n_perturbations: int = 1
    check_every: int = 100
    shard_batch: bool = True
    shared_disk: bool = False

    def __post_init__(self) -> None:
        for name in ("n_perturbations", "check_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "n_perturbations" else 0):
                low = 1 if name == "n_perturbations" else 0
                raise ValueError(f"{name}={v!r} must be an int >= {low}")
        for name in ("shard_batch", "shared_disk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")


# ---- pure math: per-sample losses, shards, the global estimate -------------------------------------


def per_sample_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the sum of next-token cross-entropies over labelled positions, and their count.

    logits: (B, T, V); labels: (B, T), -100 where unlabelled. Returns (B,) float64 sums (each token's
    loss is computed in fp32, then summed in float64) and (B,) float64 counts.
    """
    b, t, _ = logits.shape
    log_probs, targets = next_token_log_probs(logits, labels)  # (B*(T-1), 1), (B*(T-1),)
    ce = F.nll_loss(log_probs, targets, ignore_index=-100, reduction="none").view(b, t - 1)  # 0 where ignored
    return ce.double().sum(dim=1), (labels[:, 1:] != -100).sum(dim=1).double()


def shard_rows(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a global batch of ``n_rows`` that ``rank`` evaluates.

    Contiguous shards in rank order, the first ``n_rows % world_size`` ranks one row longer, so the
    ranks' rows concatenated in rank order are the global batch.

    >>> [shard_rows(5, r, 2) for r in range(2)]
    [(0, 3), (3, 5)]
    """
    if n_rows < world_size:
        raise ValueError(
            f"the global batch has {n_rows} rows but there are {world_size} ranks; each rank "
            f"needs at least one row: use a batch size of at least {world_size}"
        )
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def reduce_rows(rows: Sequence[torch.Tensor], n_groups: int) -> list[float]:
    """Every copy's loss from the ranks' ``(B_r, 2·G)`` rows ``[sum_0, count_0, sum_1, count_1, ...]``.

    Copy i's loss is ``Σ sum_i / Σ count_i`` over every row (rows of ranks that did not run it are 0), each
    sum a ``math.fsum`` (correctly rounded), so the result is a function of the multiset of values only; NaN
    where no token counted.
    """
    table = torch.cat(list(rows)).tolist() if rows else []
    out = []
    for i in range(n_groups):
        count = math.fsum(r[2 * i + 1] for r in table)
        out.append(math.fsum(r[2 * i] for r in table) / count if count else math.nan)
    return out


def weight_checksum(flat: torch.Tensor) -> int:
    """A position-sensitive hash in [0, 2**31 − 1) of the bits of a flat fp32 tensor, on its device.

    ``Σ_i (bits_i mod P)·m_i mod P`` with ``m_i = 1 + (A·i + B) mod (P − 1)``: changing any single
    element (by less than P in its bit pattern) always changes it. Integer arithmetic, no overflow,
    so it is the same on every rank whatever the reduction order.
    """
    bits = flat.view(torch.int32)
    h = torch.zeros((), dtype=torch.int64, device=flat.device)
    for lo in range(0, bits.numel(), _HASH_CHUNK):
        x = bits[lo : lo + _HASH_CHUNK].to(torch.int64).bitwise_and_(0xFFFFFFFF).remainder_(_P)
        m = torch.arange(lo, lo + x.numel(), dtype=torch.int64, device=flat.device)
        m.mul_(_A).add_(_B).remainder_(_P - 1).add_(1)  # i < 2**33, A < 2**31: no overflow
        h = (h + x.mul_(m).remainder_(_P).sum()).remainder_(_P)
    return int(h)


def _shard(batch: Mapping[str, Any], start: int, stop: int, n_rows: int) -> dict[str, Any]:
    """Rows ``[start, stop)`` of every tensor in ``batch`` whose dim 0 is the batch size; others as they are."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_rows:
            value = value[start:stop]
        out[key] = value
    return out


def _log_hash(log: Sequence[Any]) -> int:
    digest = hashlib.blake2b(digest_size=7)
    for e in log:
        digest.update(struct.pack("<Qddd", e.step_seed, e.projected_grad, e.lr, e.weight_decay))
    return int.from_bytes(digest.digest(), "little")


# ---- the runtime: one per engine -------------------------------------------------------------------


class Replicas:
    """The engine's data-parallel runtime: rank, group, the step and the guard."""

    def __init__(self, spec: DataParallel) -> None:
        import torch.distributed as dist

        self.spec = spec
        self.group = spec.group if spec.group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.global_rank = dist.get_rank()
        self.backend = dist.get_backend(self.group)
        if spec.n_perturbations > self.world_size:
            raise ValueError(
                f"n_perturbations={spec.n_perturbations} exceeds the {self.world_size} ranks; each "
                f"perturbation needs a rank: use n_perturbations <= {self.world_size}"
            )
        self.n_steps = 0
        self.n_consolidations = 0  # shared_disk: collective write-backs of the shared disk blocks so far
        self._global_rows = 0
        self.last_rows: list[torch.Tensor] = []  # the gathered per-sample rows of the last step (CPU)

    def rank_dir(self, disk_dir: str | os.PathLike | None) -> str | os.PathLike | None:
        """Each process its own disk directory: ``disk_dir/rank{global rank}`` when several ranks run.

        With ``shared_disk`` every rank uses ``disk_dir`` itself, which must then be given.
        """
        if self.spec.shared_disk:
            if disk_dir is None:
                raise ValueError(
                    "DataParallel(shared_disk=True) shares the disk tier's files between ranks but disk_dir "
                    "is None; pass the same disk_dir='runs/disk' on every rank, or drop shared_disk"
                )
            return disk_dir
        if disk_dir is None or self.world_size == 1:
            return disk_dir
        return os.path.join(os.fspath(disk_dir), f"rank{self.global_rank}")

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; a collective."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _comm_device(self, device: torch.device) -> torch.device:
        return device if self.backend == "nccl" else torch.device("cpu")

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return out

    def _gather_rows(
        self, local: torch.Tensor, header: torch.Tensor, device: torch.device, *, one_row: bool = False
    ) -> list[torch.Tensor]:
        """Every rank's ``(B_r, C)`` rows, in rank order, after checking the headers agree."""
        dev = self._comm_device(device)
        cols = max(3, local.shape[1])
        size = torch.tensor([local.shape[0]], dtype=torch.float64)
        head = torch.zeros(1, cols, dtype=torch.float64)
        head[0, :3] = header.double()
        body = torch.zeros(local.shape[0], cols, dtype=torch.float64)
        body[:, : local.shape[1]] = local.double().cpu()
        packed = torch.cat([head, size.expand(1, cols), body])
        if one_row:
            width = 3
        elif not self.spec.shard_batch:  # shards of unknown length: agree on the padded length first
            sizes = self._all_gather(torch.tensor([local.shape[0]], dtype=torch.int64, device=dev))
            width = 2 + max(int(s) for s in sizes)
        else:
            width = 2 + max(
                b - a
                for a, b in (
                    shard_rows(self._global_rows, r, self.world_size) for r in range(self.world_size)
                )
            )
        padded = torch.zeros(width, cols, dtype=torch.float64)
        padded[: packed.shape[0]] = packed
        tables = [t.cpu() for t in self._all_gather(padded.to(dev))]
        ref = tables[0][0]
        for r, t in enumerate(tables):
            if not torch.equal(t[0], ref):
                lr, n_log, seed = t[0, :3].tolist()
                raise ReplicaDivergenceError(
                    f"rank {r} starts step with lr={lr}, {int(n_log)} log entries, seed {int(seed)}, but rank 0 "
                    f"has lr={ref[0].item()}, {int(ref[1])} entries, seed {int(ref[2])}; every rank must run "
                    "the same config, lr schedule and number of steps"
                )
        return [t[2 : 2 + int(t[1, 0]), : local.shape[1]] for t in tables]

    # ---- the collective seam (zo2tier/collective.py) -----------------------------------------------------
    def perturbations(self, q: int, auto: bool = False) -> int:
        """The estimator's q: ``DataParallel(n_perturbations=q)`` spreads q perturbations over the ranks. With
        ``auto`` (q the planner's choice) that spread is the q: the ranks, not the transfers, set it."""
        split = self.spec.n_perturbations
        if auto and split > 1:
            return split
        if split > 1 and q not in (1, split):
            raise ValueError(f"MeZOConfig(n_perturbations={q}) and DataParallel(n_perturbations={split}) disagree; "
                             "set one of them (DataParallel's spreads the perturbations over the ranks)")
        return max(q, split)

    def before_step(self, engine: Any) -> None:
        """The consistency guard before every ``check_every``-th step (step 0 included)."""
        if self.spec.check_every and self.n_steps % self.spec.check_every == 0:
            self.check(engine)
        self.n_steps += 1

    def shard(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """This rank's contiguous rows of the global batch (or the batch itself without ``shard_batch``)."""
        self._global_rows = unpack(batch, torch.device("cpu"))[0].shape[0]  # also checks the batch's shape
        if not self.spec.shard_batch:
            return batch
        return _shard(batch, *shard_rows(self._global_rows, self.rank, self.world_size), self._global_rows)

    def widest_shard(self, local_rows: int) -> int:
        """Rows of rank 0's shard of the last batch, the widest: ``auto`` plans for it on every rank, so an
        uneven split (9 rows over 2 ranks: 5 and 4) cannot make the ranks pick different q."""
        if not self.spec.shard_batch:
            return local_rows
        start, stop = shard_rows(self._global_rows, 0, self.world_size)
        return stop - start

    def copies_to_run(self, groups: Sequence[Group]) -> tuple[int, ...]:
        """Every copy; with ``DataParallel(n_perturbations=q)``, the copies of perturbation ``rank % q``."""
        q = self.spec.n_perturbations
        return tuple(i for i, g in enumerate(groups) if q == 1 or g.k is None or g.k == self.rank % q)

    def losses(self, logits: Sequence[torch.Tensor], labels: torch.Tensor, ran: Sequence[int], n_groups: int, *,
               loss_fn: Callable[[torch.Tensor, Mapping[str, Any]], float] | None, batch: Mapping[str, Any],
               header: tuple[float, int, int], device: torch.device) -> list[float]:
        """Every copy's global loss: per-sample ``[sum, count]`` rows gathered from every rank, reduced with
        ``math.fsum`` (the token-weighted mean over every sample that ran the copy).

        With ``loss_fn`` (a mean over the samples it is given), rank r contributes one row ``[n_r·L_r, n_r]``
        per copy: the sample-weighted mean of the ranks' means.
        """
        n = labels.shape[0]
        rows = 1 if loss_fn is not None else n
        local = torch.zeros(rows, 2 * n_groups, dtype=torch.float64)
        for x, i in zip(logits, ran):
            if loss_fn is None:
                sums, counts = per_sample_token_losses(x, labels)
                local[:, 2 * i], local[:, 2 * i + 1] = sums.cpu(), counts.cpu()
            else:
                local[0, 2 * i], local[0, 2 * i + 1] = n * float(loss_fn(x, batch)), float(n)
        self.last_rows = self._gather_rows(local, torch.tensor(header, dtype=torch.float64), device,
                                           one_row=loss_fn is not None)
        return reduce_rows(self.last_rows, n_groups)

    @torch.no_grad()
    def checksums(self, engine: Any) -> torch.Tensor:
        """(n_blocks + 1, 2) int64: per block [hash, float64 sum bits] of its clean fp32 weights; last row: the log."""
        engine.tiers.drain()
        rows = []
        for record in engine.table:
            work = engine.runner.materialize(record, scratch=engine.runner.work)  # every logged update applied
            total = torch.tensor(float(work.sum(dtype=torch.float64)), dtype=torch.float64)
            rows.append([weight_checksum(work), int(total.view(torch.int64))])
        engine.tiers.drain()
        rows.append([_log_hash(engine.log), len(engine.log)])
        return torch.tensor(rows, dtype=torch.int64)

    def check(self, engine: Any) -> None:
        local = self.checksums(engine)
        tables = [t.cpu() for t in self._all_gather(local.to(self._comm_device(engine.device)))]
        names = [r.name for r in engine.table] + ["<update log>"]
        for i, name in enumerate(names):
            bad = [r for r, t in enumerate(tables) if not torch.equal(t[i], tables[0][i])]
            if not bad:
                continue
            r = bad[0]

            def show(row: torch.Tensor, is_log: bool = i == len(names) - 1) -> str:
                if is_log:
                    return f"log hash {int(row[0]):#x} over {int(row[1])} entries"
                return f"checksum {int(row[0]):#x}, sum {row[1:].view(torch.float64).item():.9g}"

            raise ReplicaDivergenceError(
                f"replicas diverged before data-parallel step {self.n_steps}: block {name!r} (index {i}) is the "
                f"first that differs; rank {r} has {show(tables[r][i])}, rank 0 has {show(tables[0][i])} "
                f"(ranks differing there: {bad}). Every rank must load the same weights and config; if they did, "
                "suspect a hardware fault on that rank and restart from the last checkpoint"
            )


def attach(data_parallel: DataParallel | bool | None) -> Replicas | None:
    """The engine's runtime for ``data_parallel``: None -> WORLD if initialised with > 1 rank; False -> off."""
    if data_parallel is False:
        return None
    if data_parallel is None or data_parallel is True:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if data_parallel is True:
                raise ValueError(
                    "data_parallel=True needs an initialised torch.distributed process group; "
                    "call torch.distributed.init_process_group() first (torchrun sets the env)"
                )
            return None
        if data_parallel is None and dist.get_world_size() == 1:
            return None
        data_parallel = DataParallel()
    if not isinstance(data_parallel, DataParallel):
        raise ValueError(f"data_parallel must be a DataParallel, True, False or None; got {data_parallel!r}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "data_parallel needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first"
        )
    return Replicas(data_parallel)


def check_replicas(engine: Any) -> None:
    """Compare every block's weights (and the update log) across ranks; raise on the first difference.

    A collective: every rank of the engine's group must call it at the same point. Costs one pass over
    all weights (disk blocks are read once). Raises ValueError if the engine is not data-parallel.
    """
    dp = engine.collective
    if not isinstance(dp, Replicas):
        raise ValueError("this engine is not data-parallel; build it with data_parallel=DataParallel(...)")
    dp.check(engine)
