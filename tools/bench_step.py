"""Benchmark one tiered MeZO step on a random-init model of a real shape; prints one JSON line.

    python tools/bench_step.py --model=opt-13b --batch=1 --seq=2048 --budget=device=8GiB,host=100GiB \
        --storage=host=fp16 --write-back-every=1 --baseline

Blocks are generated straight into their tiers (never the whole model on the host first). With
``--baseline`` the same process also runs plain MeZO with every weight on the GPU (in-place ``randn`` +
``add_``, 4 passes) on the same shape, and reports its tok/s beside ours. ``--repeat=3`` alternates the two
(tiered, baseline, tiered, ...) and reports the median of the per-pair ratios: calls differ by ~4%.
``--out-of-place-baseline`` adds, on the same weights, MeZO's step written the way its published trainer
writes it (``p = p + z * eps`` and the like, each expression allocating its result), to compare with the MeZO
figure docs/design.md quotes from the peers' table.

GPU peaks (NVML and torch) cover the first tiered run's steps only, not the build and not the baseline;
``gpu_build_peak_nvml_gib`` reports the build. ``--mem-snapshot=F`` dumps the allocator's history over the
last step of that run (open it at pytorch.org/memory_viz).

With disk blocks it also measures the raw O_DIRECT read and write rates of the disk folder after the steps,
and reports ``disk_bound_step_s`` (the disk's bytes per step at those rates) and ``step_over_disk_bound``.
Every run reports ``predicted_step_s``: zo2tier.predict on the engine's own plan with the rates measured in
the run. ``--calibration-out=PATH`` merges those rates (and, with ``--baseline``, the forward TFLOP/s of
plain MeZO's two forwards) into a calibration JSON for ``zo2tier plan --calibration=PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _rates import measured_rates
from _shapes import SHAPES, drop_page_cache, model_config  # bench_dp imports these from here

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class RandomInit:
    """A weight source that draws each tensor when asked: normal(0, 0.02), norms 1, biases 0."""

    def __init__(self, model, device) -> None:
        from zo2tier.model.loading import StateSource

        self._inner = StateSource(model)
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self._device = device

    def get(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        if name.endswith("bias"):
            return torch.zeros(shape, device=self._device)
        if "norm" in name or "ln" in name.split(".")[-2]:
            return torch.ones(shape, device=self._device)
        return torch.randn(shape, device=self._device) * 0.02

    def buffer_keys(self):
        return self._inner.buffer_keys()


class Sampler:
    """Polls GPU memory through NVML (nvidia-smi) and host RSS while the run goes on."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.gpu_peak_bytes = 0
        self.rss_peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _gpu_used(self) -> int:
        try:
            return int(torch.cuda.device_memory_used())
        except Exception:  # noqa: BLE001 - NVML missing: ask nvidia-smi
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, check=False, text=True).stdout
            return int(out.split()[0]) * 2**20 if out.strip() else 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.rss_peak_bytes = max(self.rss_peak_bytes, self._proc.memory_info().rss)
            if torch.cuda.is_available():
                self.gpu_peak_bytes = max(self.gpu_peak_bytes, self._gpu_used())
            time.sleep(0.05)

    def reset(self) -> None:
        """Forget the GPU peak so far (the build's): the next readings start a new window. RSS keeps its peak."""
        self.gpu_peak_bytes = 0

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_tiered(args, device: torch.device):
    """The engine over a random-init model, its blocks generated straight into their tiers."""
    from transformers import AutoModelForCausalLM

    import zo2tier
    from zo2tier.model.loading import params_on_meta

    with params_on_meta():
        model = AutoModelForCausalLM.from_config(model_config(args.model), dtype=torch.float16 if device.type == "cuda" else torch.float32)
    storage = dict(p.split("=") for p in args.storage.split(",")) if args.storage else None
    t0 = time.perf_counter()
    engine = zo2tier.ZOEngine(model, budget=args.budget, disk_dir=args.disk_dir, device=device,
                              config=zo2tier.MeZOConfig(lr=1e-7, eps=1e-3, seed=0, estimator=args.estimator,
                                                        n_perturbations=_q(args.perturbations)), storage=storage,
                              write_back_every=args.write_back_every, lookahead_blocks=args.lookahead,
                              _source=RandomInit(model, device))
    return engine, model, time.perf_counter() - t0


def _q(text: str) -> int | str:
    return text if text == "auto" else int(text)


def run_tiered(args, engine, device: torch.device, snapshot: str = "") -> dict:
    """``args.steps`` steps (or eval passes); the median of the steady ones, bytes moved per tier."""
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids}
    times, moved = [], []
    for i in range(args.steps):
        before = (engine.tiers.bytes_read, engine.tiers.bytes_written, engine.tiers.h2d_bytes, engine.tiers.d2h_bytes)
        sync(device)
        t = time.perf_counter()
        last = i == args.steps - 1  # the last step, steady state
        if snapshot and last:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        with engine.trace(args.trace) if args.trace and last else contextlib.nullcontext():
            if args.phase == "train":
                engine.step(batch)
            else:
                engine.evaluate(batch)
            sync(device)
        times.append(time.perf_counter() - t)
        if snapshot and last:
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        after = (engine.tiers.bytes_read, engine.tiers.bytes_written, engine.tiers.h2d_bytes, engine.tiers.d2h_bytes)
        moved.append([a - b for a, b in zip(after, before)])
    steady = times[args.warmup:] or times
    step_s = statistics.median(steady)
    step_s_mean = statistics.mean(steady)  # with write-backs every K steps, the mean carries their cost
    steady_moved = moved[args.warmup:] or moved
    last = [sum(m[i] for m in steady_moved) / len(steady_moved) for i in range(4)]  # mean bytes per step
    from zo2tier.zo import fused

    n_params = sum(p.numel for p in engine.layout.params)
    counts = {t: sum(1 for v in engine.placement.values() if v == t) for t in ("device", "host", "disk")}
    return {
        "step_s": step_s, "step_s_mean": step_s_mean, "tok_per_s": args.batch * args.seq / step_s, "step_times": times,
        "blocks_per_tier": counts, "storage": engine.storage,
        "int8_encoder": "triton" if fused.available(engine.device, torch.int8) else "torch",
        "z_math": "fast" if fused.available(engine.device, torch.float16) else "cpu",
        "disk_read_bytes_per_step": last[0], "disk_write_bytes_per_step": last[1],
        "h2d_bytes_per_step": last[2], "d2h_bytes_per_step": last[3],
        "disk_read_gbps": last[0] / step_s / 1e9, "disk_write_gbps": last[1] / step_s / 1e9,
        "h2d_gbps": last[2] / step_s / 1e9, "d2h_gbps": last[3] / step_s / 1e9,
        "disk_bytes_per_param_step": (last[0] + last[1]) / n_params, "n_params": n_params,
    }


def raw_read_gbps(engine, threads: int = 8) -> float:
    """Raw O_DIRECT read bandwidth over the engine's own block files, measured now (caches dropped)."""
    from concurrent.futures import ThreadPoolExecutor

    from zo2tier.store.io import BlockFile, aligned_empty

    engine.tiers.drain()
    records = [r for r in engine.table if r.tier == "disk"]
    drop_page_cache([r.path for r in records])
    bufs = [aligned_empty(max(r.stored_bytes for r in records)) for _ in range(threads)]

    def read(i: int) -> int:
        r = records[i]
        with BlockFile.open(r.path, write=False, direct=True) as f:
            f.read_into(bufs[i % threads], r.stored_bytes)
        return r.stored_bytes

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, range(len(records))))
    return total / (time.perf_counter() - t) / 1e9


def raw_write_gbps(engine, threads: int = 4, total: int = 4 * 2**30) -> float:
    """Raw O_DIRECT write bandwidth into the engine's disk folder, measured now: ``total`` bytes of scratch
    files (written, fsynced, removed), in blocks the size of the largest disk block."""
    from concurrent.futures import ThreadPoolExecutor

    from zo2tier.store.io import BlockFile, aligned_empty

    engine.tiers.drain()
    size = max(r.stored_bytes for r in engine.table if r.tier == "disk")
    n = max(threads, total // size)
    bufs = [aligned_empty(size) for _ in range(threads)]
    for b in bufs:
        b.random_(0, 256)
    folder = os.path.dirname(next(r.path for r in engine.table if r.tier == "disk"))
    paths = [os.path.join(folder, f"bench-write-{i}.tmp") for i in range(n)]

    def write(i: int) -> int:
        with BlockFile.open(paths[i], write=True, direct=True) as f:
            f.write_from(bufs[i % threads], size)
            f.sync(n_bytes=size)
        return size

    t = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            done = sum(pool.map(write, range(n)))
        return done / (time.perf_counter() - t) / 1e9
    finally:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


def disk_bound(record: dict) -> dict:
    """The step time the disk allows at the rates measured in this run: every disk byte read and written
    per step (the means over the steady steps) at the raw O_DIRECT rates, reads and writes one after the other."""
    read_s = record["disk_read_bytes_per_step"] / (record["raw_disk_read_gbps"] * 1e9)
    write_s = record["disk_write_bytes_per_step"] / (record["raw_disk_write_gbps"] * 1e9)
    return {"disk_bound_step_s": read_s + write_s, "step_over_disk_bound": record["step_s_mean"] / (read_s + write_s)}


def prediction(plan_input, plan, args, record: dict) -> dict:
    """What the planner predicts for this run (zo2tier.predict), calibrated with the rates this run measured."""
    from zo2tier.predict import Calibration, predict_step

    rates = measured_rates(record)
    p = predict_step(plan_input, plan, Calibration(**rates), tokens=args.batch * args.seq,
                     write_back_every=args.write_back_every, replays=0 if args.phase == "eval" else None)
    return {"predicted_step_s": p.step_s, "predicted_bound": p.bound,
            "predicted_parts_s": {"compute": p.compute_s, "bus": p.bus_s, "disk": p.disk_s},
            "predicted_over_measured": p.step_s / record["step_s_mean"],
            "predicted_note": "zo2tier.predict on the engine's plan; disk and bus rates measured in this run, "
                               "compute rates docs/design.md's; compared with the mean step (write-backs included)"}


def write_calibration(path: str, record: dict, args) -> dict:
    """Merge the rates this run measured into the calibration JSON at ``path`` (keys of
    zo2tier.predict.Calibration; what the file already holds, e.g. from tools/bench_io.py, is kept unless
    measured again here). Returns what was written."""
    rates = measured_rates(record)
    if record.get("baseline_forwards_s"):  # two forwards of the doubled batch: 4 flops per weight per token
        flops = 4 * record["n_params"] * args.batch * args.seq
        rates["forward_tflops"] = flops / record["baseline_forwards_s"] / 1e12
    data = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data.update(rates)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    return rates


def bus_gbps(device: torch.device, nbytes: int = 2**30, reps: int = 5) -> dict:
    """Pinned host<->GPU copy rates now, one way each and both at once (two streams): the bus bound."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device=device)
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def timed(copies) -> float:
        best = float("inf")
        for _ in range(reps):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            for stream, dst, src in copies:
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
        return len(copies) * nbytes / best / 1e9

    out = {"bus_h2d_gbps": timed([(up, dev, host)]), "bus_d2h_gbps": timed([(down, host2, dev2)]),
           "bus_duplex_gbps": timed([(up, dev, host), (down, host2, dev2)])}
    del host, host2, dev, dev2
    torch.cuda.empty_cache()
    return out


def bus_bound_s(record: dict) -> float:
    """The least step time the measured bus allows for this run's bytes."""
    up, down = record["h2d_bytes_per_step"], record["d2h_bytes_per_step"]
    return max(up / record["bus_h2d_gbps"], down / record["bus_d2h_gbps"],
               (up + down) / record["bus_duplex_gbps"]) / 1e9


class Baseline:
    """Plain MeZO: all weights on the GPU, in-place randn + add_ (4 passes), two forwards. Built once, so
    that it can alternate with the tiered runs; ``None`` from ``build`` when the model does not fit."""

    def __init__(self, model, device: torch.device) -> None:
        self.model, self.device = model, device
        self.params = list(model.parameters())

    @classmethod
    def build(cls, args, device: torch.device) -> Baseline | None:
        from transformers import AutoModelForCausalLM

        torch.cuda.empty_cache()
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(model_config(args.model), dtype=torch.float16)
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            return None
        return cls(model.eval(), device)

    def _perturb(self, scale: float, seed: int) -> None:
        gen = torch.Generator(self.device).manual_seed(seed)
        for p in self.params:
            z = torch.randn(p.shape, device=self.device, dtype=p.dtype, generator=gen)
            p.data.add_(z, alpha=scale)

    def _loss(self, ids: torch.Tensor) -> float:
        logits = self.model(input_ids=ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()

    @torch.no_grad()
    def _median_s(self, args, body: Callable[[torch.Tensor, int], None]) -> float:
        """Median seconds of ``body(ids, step)`` over the steady steps of ``args.steps``."""
        ids = torch.randint(0, 32000, (args.batch, args.seq), device=self.device)
        times = []
        for step in range(args.steps):
            sync(self.device)
            t = time.perf_counter()
            body(ids, step)
            sync(self.device)
            times.append(time.perf_counter() - t)
        return statistics.median(times[args.warmup:] or times)

    def _perturb_out_of_place(self, sign: float, seed: int, eps: float) -> None:
        """One perturbation pass written the way MeZO's published trainer writes it: each expression
        allocates its result (``p = p + (sign * z) * eps``), three kernels per tensor instead of one."""
        gen = torch.Generator(self.device).manual_seed(seed)
        for p in self.params:
            z = torch.randn(p.shape, device=self.device, dtype=p.dtype, generator=gen)
            p.data = p.data + sign * z * eps

    def _update_out_of_place(self, lr: float, grad: float, seed: int, decay: float = 0.0) -> None:
        """The update pass in the same style: ``p = p - lr * (grad * z + decay * p)`` on matrices, no decay on
        biases and norm weights."""
        gen = torch.Generator(self.device).manual_seed(seed)
        for p in self.params:
            z = torch.randn(p.shape, device=self.device, dtype=p.dtype, generator=gen)
            if p.dim() > 1:
                p.data = p.data - lr * (grad * z + decay * p.data)
            else:
                p.data = p.data - lr * (grad * z)

    def step(self, ids: torch.Tensor, seed: int, style: str = "inplace", eps: float = 1e-3,
             lr: float = 1e-7) -> tuple[float, float]:
        """One MeZO step; returns the two losses. ``style="inplace"`` is our reference (randn + add_);
        ``"out-of-place"`` is the same arithmetic as MeZO's own trainer runs it."""
        if style == "inplace":
            self._perturb(eps, seed)
            lp = self._loss(ids)
            self._perturb(-2 * eps, seed)
            lm = self._loss(ids)
            self._perturb(eps, seed)
            self._perturb(-lr * (lp - lm) / (2 * eps), seed)
        else:
            self._perturb_out_of_place(1.0, seed, eps)
            lp = self._loss(ids)
            self._perturb_out_of_place(-2.0, seed, eps)
            lm = self._loss(ids)
            self._perturb_out_of_place(1.0, seed, eps)
            self._update_out_of_place(lr, (lp - lm) / (2 * eps), seed)
        return lp, lm

    def run(self, args, style: str = "inplace") -> float:
        """Median seconds per steady MeZO step."""
        return self._median_s(args, lambda ids, seed: self.step(ids, seed, style))

    def forwards(self, args) -> float:
        """Median seconds of the two forwards alone: the compute floor of any MeZO step of this shape."""
        return self._median_s(args, lambda ids, _: (self._loss(ids), self._loss(ids)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="opt-1.3b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", default="device=8GiB,host=200GiB,disk=0")
    p.add_argument("--storage", default="")
    p.add_argument("--write-back-every", type=int, default=1)
    p.add_argument("--estimator", default="mezo", help="zo2tier.zo.estimators name (mezo, fzoo, ...)")
    p.add_argument("--perturbations", default="1", help="q perturbations per step, or auto")
    p.add_argument("--lookahead", type=int, default=None,
                   help="blocks prefetched ahead of the one computing (default: the engine's, see ZOEngine)")
    p.add_argument("--disk-dir", default="runs/bench-disk")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--phase", default="train", choices=["train", "eval"])
    p.add_argument("--trace", default="", help="write the last step's per-block timeline here (Chrome trace JSON)")
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--out-of-place-baseline", action="store_true",
                   help="with --baseline, also time MeZO's steps written out of place, as its own trainer "
                        "writes them (a second reference; the ratio the bars use stays the in-place one)")
    p.add_argument("--repeat", type=int, default=1,
                   help="alternate tiered and baseline runs this many times; ratios are medians over the pairs")
    p.add_argument("--mem-snapshot", default="", help="dump a torch.cuda memory snapshot of the last step here")
    p.add_argument("--calibration-out", default="",
                   help="merge the rates this run measured into this calibration JSON (zo2tier plan --calibration)")
    args = p.parse_args()
    from zo2tier.config import set_cuda_allocator_default

    set_cuda_allocator_default()  # as the zo2tier commands do (before CUDA is first used)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    record = {
        "card": torch.cuda.get_device_name(device) if cuda else "cpu",
        "date": datetime.date.today().isoformat(),
        "git_rev": os.environ.get("GIT_REV") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, check=False, text=True).stdout.strip(),
        "command": " ".join(sys.argv), "model": args.model, "batch": args.batch, "seq": args.seq, "phase": args.phase,
        "torch": torch.__version__, "budget": args.budget, "write_back_every": args.write_back_every, "repeat": args.repeat,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    runs, base_runs, oop_runs, base = [], [], [], None
    with Sampler() as sampler:
        engine, model, record["build_s"] = build_tiered(args, device)
        record.update(estimator=engine.config.estimator, q=engine.config.n_perturbations)
        if cuda:  # the peaks cover the steps, not the build (its cached blocks go back first)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            record["gpu_build_peak_nvml_gib"] = sampler.gpu_peak_bytes / 2**30
            sampler.reset()
        for r in range(args.repeat):
            runs.append(run_tiered(args, engine, device, args.mem_snapshot if r == 0 else ""))
            if r == 0 and cuda:  # before any baseline weights share the card
                record["gpu_peak_nvml_gib"] = sampler.gpu_peak_bytes / 2**30
                record["gpu_peak_torch_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                record["gpu_reserved_peak_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            if args.baseline and cuda:
                base = base or Baseline.build(args, device)
                if base is not None:
                    base_runs.append(base.run(args))
                    if args.out_of_place_baseline:
                        oop_runs.append(base.run(args, "out-of-place"))
        if base is not None:  # what bounds any ratio: the forwards alone, and the bytes over the bus
            record["baseline_forwards_s"] = base.forwards(args)
        on_disk = runs[0]["blocks_per_tier"]["disk"] > 0
        record["raw_disk_read_gbps"] = raw_read_gbps(engine) if on_disk else None
        record["raw_disk_write_gbps"] = raw_write_gbps(engine) if on_disk else None
        planned = (engine.plan_input, engine.plan)  # for the prediction, after the engine is gone
        # what the host RSS bar compares against: the host tier's blocks, and every pinned byte (blocks and
        # disk staging buffers, with whatever a chunk could not use)
        record["host_tier_gib"] = sum(r.stored_bytes for r in engine.table if r.tier == "host") / 2**30
        pinned = engine.tiers._pinned
        record["pinned_gib"] = (pinned.pinned_bytes + pinned.pageable_bytes) / 2**30
        del base
        gc.collect()
        engine.close()
        del engine, model
        gc.collect()
    record["host_rss_peak_gib"] = sampler.rss_peak_bytes / 2**30
    record["host_rss_peak_gib_getrusage"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    record["host_rss_over_pinned_gib"] = record["host_rss_peak_gib"] - record["pinned_gib"]
    record.update(runs[len(runs) // 2] if len(runs) % 2 else runs[0])  # byte counts of one run
    record["step_s_runs"] = [r["step_s"] for r in runs]
    record["step_s"] = statistics.median(record["step_s_runs"])
    record["tok_per_s"] = args.batch * args.seq / record["step_s"]
    record["step_s_mean"] = statistics.mean(r["step_s_mean"] for r in runs)
    if cuda:
        record.update(bus_gbps(device))
        record["bus_bound_step_s"] = bus_bound_s(record)
    if record["raw_disk_read_gbps"]:
        record.update(disk_bound(record))
    record.update(prediction(*planned, args, record))
    if base_runs:
        record["baseline_step_s_runs"] = base_runs
        record["baseline_step_s"] = statistics.median(base_runs)
        record["baseline_tok_per_s"] = args.batch * args.seq / record["baseline_step_s"]
        record["ratio_runs"] = [b / r["step_s"] for b, r in zip(base_runs, runs)]
        record["ratio_vs_baseline"] = statistics.median(record["ratio_runs"])
        if cuda:  # the ratios no tiered run of these bytes could beat on this card
            record["bus_bound_ratio"] = record["baseline_step_s"] / record["bus_bound_step_s"]
            record["compute_bound_ratio"] = record["baseline_step_s"] / record["baseline_forwards_s"]
            record["bound_ratio"] = min(record["bus_bound_ratio"], record["compute_bound_ratio"])
    else:
        record.update(baseline_step_s=None, baseline_tok_per_s=None)
    if oop_runs:  # a second reference, not the ratio the bars use
        record["out_of_place_baseline_step_s_runs"] = oop_runs
        record["out_of_place_baseline_step_s"] = statistics.median(oop_runs)
        record["ratio_runs_vs_out_of_place"] = [b / r["step_s"] for b, r in zip(oop_runs, runs)]
        record["ratio_vs_out_of_place_baseline"] = statistics.median(record["ratio_runs_vs_out_of_place"])
    if args.calibration_out:
        record["calibration_out"] = write_calibration(args.calibration_out, record, args)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
