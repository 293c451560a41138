"""Data-parallel scaling: 1 GPU vs N GPUs (torchrun, NCCL), tiered MeZO; one JSON line per GPU count.

    NCCL_NVLS_ENABLE=0 python tools/bench_dp.py --gpus=1,2            # OPT-13B shape, host tier, 8 x 2048
    NCCL_NVLS_ENABLE=0 python tools/bench_dp.py --disk=own --disk-dir=/nvme/tmp     # half the blocks on disk,
    NCCL_NVLS_ENABLE=0 python tools/bench_dp.py --disk=shared --disk-dir=/nvme/tmp  # own copies vs one shared
    python tools/bench_dp.py --tiny [--disk=own|shared]                 # CPU, gloo, tiny OPT: a smoke run

``--disk=none`` (default) puts every block on the host tier. ``--disk=own`` puts the last ``--disk-blocks``
blocks (default: half) on disk, each rank its own copy in ``DIR/rank{r}``; ``--disk=shared`` puts the same
blocks in one store all ranks read (``DataParallel(shared_disk=True)``), consolidated every
``--write-back-disk`` log entries (0: the engine's default K). Stores go to a temporary directory inside
``--disk-dir`` (default: the system's), removed afterwards; ``disk_store_bytes`` is their total size.

The launcher starts ``torchrun --standalone --nproc-per-node N tools/bench_dp.py --worker`` for each N.
Every run draws the same random-init weights (same seed), runs STEPS steps on the same global batch
(each rank its shard), times the steps after WARMUP, then checks the weights:

- within one run, every rank's blocks must hash equal (``check_replicas``: exact);
- against the 1-GPU run, sampled weights must agree within ``Σ_t lr·|Δg_t|·6 + (STEPS + 1)·ulp``:
  the projected gradients may differ because matrix products see a different batch per GPU, and
  stochastic rounding of the stored copy can then go the other way by one ulp at a write-back.

``weights_agree`` is both; ``baseline_tok_per_s`` is the 1-GPU run's, ``scaling`` the ratio.
``host_rss_peak_gib`` and the GPU peaks are the largest over ranks; ``host_rss_total_gib`` sums ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

MODEL = "opt-13b"
BATCH, SEQ = 8, 2048
STEPS, WARMUP = 10, 2
LR, EPS, SEED = 1e-7, 1e-3, 0
BUDGET = "device=16GiB,host=60GiB,disk=0"
BUDGET_DISK = "device=16GiB,host=60GiB,disk=400GiB"  # the default budget with --disk=own|shared
DISK = "none"  # none | own | shared
DISK_BLOCKS = 0  # blocks on the disk tier with --disk=own|shared, the last ones (0: half of them)
WRITE_BACK_DISK = 0  # write_back_every["disk"], the consolidation interval when shared (0: engine default)
N_SAMPLES = 4096  # sampled weights per block for the cross-run comparison
TINY = {"batch": 8, "seq": 64, "lr": 1e-3, "budget": "device=1GiB,host=1GiB,disk=0",
        "budget_disk": "device=1GiB,host=1GiB,disk=1GiB", "write_back_disk": 4}


def _tiny_config():
    import transformers as tf

    return tf.OPTConfig(
        vocab_size=512,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
    )


# ---- worker: one rank ------------------------------------------------------------------------------


def _keyed_init(model, device):
    """bench_step's random init, drawn per tensor from a generator keyed by its name: the same weights
    whatever tensors a rank reads (a shared-disk follower never reads the disk blocks' tensors)."""
    import zlib

    from bench_step import RandomInit

    class KeyedInit(RandomInit):
        def get(self, name: str) -> torch.Tensor:
            torch.manual_seed(SEED ^ zlib.crc32(name.encode()))
            return super().get(name)

    return KeyedInit(model, device)


def _placement(blocks: list[str], args) -> dict[str, str]:
    n_disk = 0 if args.disk == "none" else args.disk_blocks or len(blocks) // 2
    return {b: "disk" if i >= len(blocks) - n_disk else "host" for i, b in enumerate(blocks)}


def _sample(engine) -> list[torch.Tensor]:
    """Evenly spaced fp32 weights of every block, with every logged update applied."""
    samples = []
    for record in engine.table:
        work = engine.runner.materialize(record, scratch=engine.runner.work)
        n = min(N_SAMPLES, record.numel)  # integer spacing: fp32 linspace rounds past numel - 1 at 13B sizes
        idx = torch.arange(n, device=work.device) * (record.numel - 1) // max(1, n - 1)
        samples.append(work[idx].float().cpu())
    engine.tiers.drain()
    return samples


def worker(args) -> None:
    import torch.distributed as dist
    from bench_step import Sampler, model_config
    from transformers import AutoModelForCausalLM

    import zo2tier
    from zo2tier.distributed import DataParallel, ReplicaDivergenceError, check_replicas
    from zo2tier.model.loading import params_on_meta

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ["WORLD_SIZE"])
    cuda = not args.tiny and torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo")
    config = _tiny_config() if args.tiny else model_config(args.model)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16 if cuda else torch.float32)
    model.eval()  # no dropout: L+ and L- must see the same network
    placement = _placement(zo2tier.ZOEngine.block_names(model), args)
    with Sampler() as sampler:
        engine = zo2tier.ZOEngine(
            model,
            budget=args.budget,
            device=device,
            placement=placement,
            disk_dir=None if args.disk == "none" else args.disk_dir,
            write_back_every={"disk": args.write_back_disk} if args.write_back_disk else None,
            config=zo2tier.MeZOConfig(lr=args.lr, eps=EPS, seed=SEED),
            data_parallel=DataParallel(check_every=0, shared_disk=args.disk == "shared"),
            _source=_keyed_init(model, device),  # every rank, every run: the same random init
        )
        gen = torch.Generator().manual_seed(SEED + 1)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
        batch = {"input_ids": ids}  # the global batch; the engine takes this rank's shard
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, grads = [], []
        for _ in range(args.steps):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            r = engine.step(batch)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
            grads.append(r.projected_grad)
        try:
            check_replicas(engine)
            replicas_equal = True
        except ReplicaDivergenceError as exc:
            print(f"rank {rank}: {exc}", file=sys.stderr)
            replicas_equal = False
        samples = _sample(engine)
        counts = {t: sum(1 for v in engine.placement.values() if v == t) for t in ("device", "host", "disk")}
        storage = dict(engine.storage)
        engine.close()
        consolidations = engine.collective.n_consolidations
    io = {"disk_read_bytes": engine.tiers.bytes_read, "disk_written_bytes": engine.tiers.bytes_written}
    step_s = statistics.median(times[args.warmup :] or times)
    mine = dict(
        rank=rank,
        step_s=step_s,
        step_times=times,
        gpu_peak_torch_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        gpu_peak_nvml_gib=sampler.gpu_peak_bytes / 2**30 if cuda else None,
        host_rss_peak_gib=sampler.rss_peak_bytes / 2**30,
        **io,
    )
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        card = torch.cuda.get_device_name(device) if cuda else "cpu"
        summary = {
            "card": card,
            "n_gpus": world if cuda else 0,
            "n_ranks": world,
            "step_s": max(e["step_s"] for e in everyone),
            "blocks_per_tier": counts,
            "storage": storage,
            "consolidations": consolidations,
            "disk_read_bytes": sum(e["disk_read_bytes"] for e in everyone),
            "disk_written_bytes": sum(e["disk_written_bytes"] for e in everyone),
            "grads": grads,
            "replicas_equal": replicas_equal,
            "gpu_peak_torch_gib": None if not cuda else max(e["gpu_peak_torch_gib"] for e in everyone),
            "gpu_peak_nvml_gib": None if not cuda else max(e["gpu_peak_nvml_gib"] for e in everyone),
            "host_rss_peak_gib": max(e["host_rss_peak_gib"] for e in everyone),
            "host_rss_total_gib": sum(e["host_rss_peak_gib"] for e in everyone),
            "ranks": everyone,
        }
        with open(os.path.join(args.result_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        torch.save(samples, os.path.join(args.result_dir, "samples.pt"))
    dist.destroy_process_group()


# ---- launcher ---------------------------------------------------------------------------------------


def _agree(
    ref: dict, ref_samples, got: dict, got_samples, lr: float, steps: int, storage: str
) -> tuple[bool, float, float]:
    """(agree, max |Δθ| over the samples, tolerance) of a run against the 1-GPU run."""
    dg = sum(abs(a - b) for a, b in zip(ref["grads"], got["grads"]))
    eps = torch.finfo({"fp16": torch.float16, "bf16": torch.bfloat16}.get(storage, torch.float32)).eps
    worst, ok = 0.0, True
    for a, b in zip(ref_samples, got_samples):
        diff = (a - b).abs()
        tol = lr * dg * 6.0 + (steps + 1) * eps * a.abs()  # elementwise
        ok &= bool((diff <= tol + 1e-30).all())
        worst = max(worst, float(diff.max()))
    return ok, worst, lr * dg * 6.0


def launch(args) -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=False, text=True)
    rev_s = os.environ.get("GIT_REV") or rev.stdout.strip()  # the GPU machine's copy may carry a stale .git
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    batch, seq, lr = args.batch, args.seq, args.lr
    passthrough = [
        f"--model={args.model}",
        f"--batch={batch}",
        f"--seq={seq}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--lr={lr}",
        f"--budget={args.budget}",
        f"--disk={args.disk}",
        f"--disk-blocks={args.disk_blocks}",
        f"--write-back-disk={args.write_back_disk}",
    ] + (["--tiny"] if args.tiny else [])
    ref = None
    if args.disk_dir:
        os.makedirs(args.disk_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=args.disk_dir) as disk_tmp:
        for n in [int(x) for x in args.gpus.split(",")]:
            out = os.path.join(tmp, f"n{n}")
            os.makedirs(out)
            disk_dir = os.path.join(disk_tmp, f"n{n}")
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={n}",
                os.path.abspath(__file__),
                "--worker",
                f"--result-dir={out}",
                f"--disk-dir={disk_dir}",
                *passthrough,
            ]
            subprocess.run(cmd, env=env, check=True, cwd=ROOT)
            disk_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(disk_dir) for f in fs)
            with open(os.path.join(out, "summary.json")) as f:
                got = json.load(f)
            samples = torch.load(os.path.join(out, "samples.pt"))
            if ref is None:
                ref = (got, samples)
            storage = got["storage"]["disk" if args.disk != "none" else "host"]
            agree, worst, g_part = _agree(ref[0], ref[1], got, samples, lr, args.steps, storage)
            tok_per_s = batch * seq / got["step_s"]
            base = batch * seq / ref[0]["step_s"]
            print(
                json.dumps(
                    {
                        "card": got["card"],
                        "date": datetime.date.today().isoformat(),
                        "git_rev": rev_s,
                        "command": " ".join(
                            ["NCCL_NVLS_ENABLE=0", "python", "tools/bench_dp.py", *sys.argv[1:]]
                        ),
                        "model": "opt-tiny" if args.tiny else args.model,
                        "batch": batch,
                        "seq": seq,
                        "phase": "train",
                        "blocks_per_tier": got["blocks_per_tier"],
                        "storage": got["storage"],
                        "disk": args.disk,
                        "disk_store_bytes": disk_bytes,
                        "disk_read_bytes": got["disk_read_bytes"],
                        "disk_written_bytes": got["disk_written_bytes"],
                        "consolidations": got["consolidations"],
                        "write_back_disk": args.write_back_disk or None,
                        "tok_per_s": tok_per_s,
                        "step_s": got["step_s"],
                        "baseline_tok_per_s": base,
                        "scaling": tok_per_s / base,
                        "gpu_peak_nvml_gib": got["gpu_peak_nvml_gib"],
                        "gpu_peak_torch_gib": got["gpu_peak_torch_gib"],
                        "host_rss_peak_gib": got["host_rss_peak_gib"],
                        "host_rss_total_gib": got["host_rss_total_gib"],
                        "n_gpus": got["n_gpus"],
                        "n_ranks": got["n_ranks"],
                        "weights_agree": bool(agree and got["replicas_equal"]),
                        "replicas_equal": got["replicas_equal"],
                        "weights_max_abs_diff": worst,
                        "weights_tol_g_part": g_part,
                        "grads": got["grads"],
                        "steps": args.steps,
                        "lr": lr,
                        "torch": torch.__version__,
                    }
                ),
                flush=True,
            )
            if not math.isfinite(tok_per_s):
                raise SystemExit("a run reported no step time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="GPU counts (ranks with --tiny), the first is the baseline")
    p.add_argument(
        "--tiny", action="store_true", help="CPU + gloo + a tiny OPT: a smoke run of the whole path"
    )
    p.add_argument("--model", default=MODEL)
    p.add_argument("--batch", type=int, default=BATCH, help="global batch, split across ranks")
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--budget", default=BUDGET, help="per rank: blocks go to the host tier (and disk, --disk)")
    p.add_argument("--disk", default=DISK, choices=("none", "own", "shared"),
                   help="no disk tier; the last --disk-blocks on disk, each rank its own copy; or one shared copy")
    p.add_argument("--disk-blocks", type=int, default=DISK_BLOCKS, help="blocks on disk (0: half of them)")
    p.add_argument("--disk-dir", default=None, help="where the disk stores go (a temporary dir inside it)")
    p.add_argument("--write-back-disk", type=int, default=WRITE_BACK_DISK,
                   help="write_back_every for the disk tier: the consolidation interval when shared (0: default)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.budget == BUDGET and args.disk != "none":
        args.budget = BUDGET_DISK
    if args.tiny:
        args.batch, args.seq, args.lr = TINY["batch"], TINY["seq"], TINY["lr"]
        if args.budget in (BUDGET, BUDGET_DISK):
            args.budget = TINY["budget" if args.disk == "none" else "budget_disk"]
        args.write_back_disk = args.write_back_disk or TINY["write_back_disk"]
    if args.worker:
        worker(args)
        return
    launch(args)


if __name__ == "__main__":
    main()
