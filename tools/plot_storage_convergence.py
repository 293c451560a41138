"""Loss curves of one tiny MeZO task under fp32, bf16+SR, int8+SR and bf16 round-to-nearest storage.

Every weight (the resident set too) is stored in the given dtype, the blocks on the host tier, written back
every step, so each update goes through encode/decode. The lr keeps most updates below the bf16 quantum of
the weights: stochastic rounding keeps them on average, round-to-nearest drops them. The random init is
scaled by INIT_SCALE (weight matrices and embeddings; norms stay 1) so typical weights have the size of a
pretrained model's (std 0.2 instead of 0.02): only then is an lr-sized update smaller than half a bf16
quantum of most weights, as it is in a real fine-tune. Writes docs/storage_convergence.png and .json.

    python tools/plot_storage_convergence.py --steps=300 --lr=2e-5 --init_scale=10
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tempfile
import time
from unittest import mock

import torch
from _options import parse_overrides

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from tiny_models import tiny_batch, tiny_model

import zo2tier
from zo2tier.tiers import codec

STEPS = 300
LR = 2e-5
EPS = 1e-3
EVAL_EVERY = 10
INIT_SCALE = 10.0
OUT = os.path.join(HERE, "..", "docs", "storage_convergence")
RUNS = ("fp32", "bf16+SR", "int8+SR", "bf16 nearest")


def _args() -> dict:
    cfg = {"steps": STEPS, "lr": LR, "eps": EPS, "eval_every": EVAL_EVERY, "init_scale": INIT_SCALE, "out": OUT}
    return parse_overrides(cfg)


def _curve(run: str, cfg: dict, batch: dict) -> list[tuple[int, float]]:
    dtype = run.split("+")[0].split(" ")[0]
    nearest = run.endswith("nearest")
    model = tiny_model("llama", seed=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # matrices and embeddings; norm weights stay at 1
                p.mul_(cfg["init_scale"])
    placement = {b: "host" for b in zo2tier.ZOEngine.block_names(model)}
    storage = {"device": dtype, "host": dtype}
    config = zo2tier.MeZOConfig(lr=cfg["lr"], eps=cfg["eps"], seed=0)
    real_encode = codec.encode

    def encode(*a, **kw):  # round-to-nearest on every write-back (the start encode already is)
        kw["stochastic"] = kw.get("stochastic", True) and not nearest
        return real_encode(*a, **kw)

    curve = []
    with (
        mock.patch("zo2tier.engine.encode", encode),
        tempfile.TemporaryDirectory() as tmp,
        zo2tier.ZOEngine(model, budget={"device": "1GiB", "host": "1GiB"}, disk_dir=tmp, config=config,
                         placement=placement, storage=storage, write_back_every=1) as engine,
    ):
        for t in range(cfg["steps"] + 1):
            if t % cfg["eval_every"] == 0:
                curve.append((t, engine.evaluate(batch)))
            if t < cfg["steps"]:
                engine.step(batch)
    return curve


def main() -> None:
    cfg = _args()
    batch = tiny_batch(batch=4, seq=16)
    curves, start_s = {}, time.perf_counter()
    for run in RUNS:
        curves[run] = _curve(run, cfg, batch)
        print(f"{run}: {curves[run][0][1]:.4f} -> {curves[run][-1][1]:.4f}", file=sys.stderr, flush=True)
    result = {"bench": "storage_convergence", "model": f"tiny llama (tests/tiny_models.py, seed 5), init x{cfg['init_scale']:g}",
              "task": "tiny_batch(batch=4, seq=16), one fixed batch", "config": cfg, "write_back_every": 1,
              "torch": torch.__version__, "seconds": time.perf_counter() - start_s, "curves": curves,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(cfg["out"] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], label=run,
                linestyle="--" if "nearest" in run else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (same batch)")
    ax.set_title(f"MeZO, every weight stored as shown, lr={cfg['lr']:g}, init x{cfg['init_scale']:g}, "
                 "write-back every step", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(cfg["out"] + ".png", dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}))


if __name__ == "__main__":
    main()
