"""How fast the fused CUDA kernel replays logged updates: the cost that sets K for a host tier.

For one block of NUMEL fp16 parameters (default 2**27, about one OPT-13B layer part) this times
``zo.fused.arrive`` with 0, 1, 4 and 16 pending updates, for Gaussian and Rademacher z, and fits the
seconds per replayed update (the slope) and the fixed pass (the intercept), with Gaussian z drawn through the
fast special functions, and the largest difference from the CPU spec over 2**24 values. (libdevice's
correctly rounded functions replayed at 430 G/s against 770-845 G/s, benchmarks/replay_h100.jsonl; that path
is gone.) One JSON line on stdout:
``{variant: {"pass_s", "update_s", "gnps_per_update", "max_abs_err_vs_cpu"}}`` plus the card and git revision.

    python tools/bench_replay.py [--numel=134217728] [--repeats=5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zo2tier.zo import fused
from zo2tier.zo.rng import normal
from zo2tier.zo.update import LogEntry

LOG_LENGTHS = (0, 1, 4, 16)
ACCURACY_NUMEL = 1 << 24


def time_arrive(stored, plus, minus, n_log: int, kind: str, repeats: int) -> float:
    """Median seconds of one fused pass over ``stored`` replaying ``n_log`` updates."""
    device = stored.device
    log = fused.PendingLog.build([LogEntry(t, 1000 + t, 0.1, 1e-6, 0.0) for t in range(n_log)], device)
    kw = {"param_id": 3, "decay": True, "log": log, "new_seed": 77, "eps": 1e-3, "plus": plus, "minus": minus, "write_to": None,
          "sr_seed": 0, "sr_key": 0, "sr_offset": 0, "kind": kind}
    fused.arrive(stored, **kw)  # compiles
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fused.arrive(stored, **kw)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def z_error(device: torch.device) -> float:
    """Largest |z_gpu - z_cpu| over ACCURACY_NUMEL elements of one parameter (the kernel at eps = 1 on zeros)."""
    zeros = torch.zeros(ACCURACY_NUMEL, device=device)
    got = torch.empty_like(zeros)
    fused.arrive(zeros, param_id=5, decay=False, log=fused.PendingLog.build([], device), new_seed=4242, eps=1.0,
                 plus=got, minus=None, write_to=None, sr_seed=0, sr_key=0, sr_offset=0)
    return float((got.cpu() - normal(4242, 5, ACCURACY_NUMEL)).abs().max())


def fit(xs, ys) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--numel", type=int, default=1 << 27)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available() or not fused.available(torch.device("cuda"), torch.float16):
        sys.exit("bench_replay.py needs CUDA and Triton")
    device = torch.device("cuda")
    stored = torch.randn(args.numel, device=device).half()
    plus, minus = torch.empty_like(stored), torch.empty_like(stored)
    record = {"card": torch.cuda.get_device_name(device), "date": datetime.date.today().isoformat(),
              "git_rev": os.environ.get("GIT_REV") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                      capture_output=True, check=False, text=True).stdout.strip(),
              "command": " ".join(sys.argv), "numel": args.numel, "torch": torch.__version__}
    for kind in ("gaussian", "rademacher"):
        secs = {n: time_arrive(stored, plus, minus, n, kind, args.repeats) for n in LOG_LENGTHS}
        base, per_update = fit(list(secs), list(secs.values()))
        name = kind if kind == "rademacher" else f"{kind}_fast"
        record[name] = {"seconds": {str(n): s for n, s in secs.items()}, "pass_s": base, "update_s": per_update,
                        "gnps_per_update": args.numel / per_update / 1e9}
        if kind == "gaussian":  # against the CPU spec (zo.rng), over the first ACCURACY_NUMEL elements
            record[name]["max_abs_err_vs_cpu"] = z_error(device)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
