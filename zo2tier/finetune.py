"""``torchrun --nproc-per-node N -m zo2tier.finetune [zo2tier finetune flags]``: data-parallel fine-tuning.

A thin entry: it initialises the process group from torchrun's environment (NCCL when ``--device`` is a
GPU, gloo otherwise), gives each rank its own GPU and output folder, then runs ``zo2tier finetune``.
Every rank loads the same data in the same order (same ``--seed``) and passes the global batch to the
engine, which runs its own shard and all-gathers per-sample losses (``zo2tier/distributed.py``); the
engine also gives each rank its own disk directory, ``--disk-dir``/rank{r}.

Per rank: ``--device cuda`` becomes ``cuda:{LOCAL_RANK}``; rank r > 0 writes to ``--out``.rank{r} and
shows no progress bar. Without torchrun's environment (or with one process) it is ``zo2tier finetune``.

Example::

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m zo2tier.finetune --model DIR --train train.csv \\
        --test test.csv --batch-size 16 --device cuda --budget device=20GiB,host=64GiB \\
        --disk-dir runs/disk --out runs/out
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells a worker through its environment."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LaunchEnv | None:
        """The launch environment, or None when not started by torchrun (no ``WORLD_SIZE``/``RANK``)."""
        if "WORLD_SIZE" not in environ or "RANK" not in environ:
            return None
        try:
            rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            local = int(environ.get("LOCAL_RANK", rank))
        except ValueError as exc:
            raise ValueError(f"torchrun environment is malformed ({exc}); launch with torchrun") from None
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); launch with torchrun")
        return cls(rank, local, world)


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            out += [flag, value]
            i += 2
            continue
        out.append(f"{flag}={value}" if argv[i].startswith(flag + "=") else argv[i])
        i += 1
    return out


def rank_argv(argv: Sequence[str], env: LaunchEnv) -> list[str]:
    """``zo2tier finetune`` flags for this rank: its own GPU, output folder and no progress bar on rank > 0.

    >>> rank_argv(["--device", "cuda", "--out", "runs/out"], LaunchEnv(1, 1, 2))
    ['--device', 'cuda:1', '--out', 'runs/out.rank1', '--no-progress']
    """
    argv = list(argv)
    if _flag_value(argv, "--device") == "cuda":
        argv = _set_flag(argv, "--device", f"cuda:{env.local_rank}")
    out = _flag_value(argv, "--out")
    if env.rank > 0 and out is not None:
        argv = _set_flag(argv, "--out", f"{out.rstrip('/')}.rank{env.rank}")
        if "--no-progress" not in argv:
            argv.append("--no-progress")
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Initialise the process group from torchrun's environment, then run ``zo2tier finetune``."""
    from zo2tier import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    env = LaunchEnv.from_environ(os.environ)
    if env is None or env.world_size == 1:
        return cli.main(["finetune", *argv])
    import torch
    import torch.distributed as dist

    argv = rank_argv(argv, env)
    on_gpu = (_flag_value(argv, "--device") or "cpu").startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(torch.device(_flag_value(argv, "--device")))
    dist.init_process_group("nccl" if on_gpu else "gloo")  # env:// (MASTER_ADDR, MASTER_PORT, RANK, ...)
    try:
        return cli.main(["finetune", *argv])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
