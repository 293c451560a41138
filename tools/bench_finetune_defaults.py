"""Run ``zo2tier finetune`` once, as a user would, and write one JSON record of where it ended.

    python tools/bench_finetune_defaults.py --data=runs/tta/data/tweets-seed0-4000-500-1000 --model=SMOLLM2.gguf \\
        --flags="--estimator fzoo --steps 500 --device cuda" --out=benchmarks/finetune_defaults.jsonl

``--data`` is a folder of ``tools/tasks.py`` (train/dev/test CSV and task.json with the prompt). The command is
``zo2tier finetune`` with that prompt, dev and test, a budget that keeps every layer on the device, test
accuracy at every ``--eval_every`` for the curve, and ``--flags`` (what the run is about; the CLI's defaults fill
the rest). The record (kind ``finetune_defaults``) holds the command, the settings the run logged, zero-shot and
final test accuracy, the curve from OUT/log.jsonl, and whether it ended below zero-shot.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _options import parse_overrides
from bench_time_to_accuracy import card, git_rev, model_dir

DEFAULTS = {
    "data": "",  # a tools/tasks.py folder
    "model": "smollm2",  # a store, HF folder or .gguf; smollm2: the bundled GGUF
    "flags": "",  # finetune flags the run is about, e.g. "--estimator fzoo --steps 500 --device cuda"
    "budget": "device=16GiB,host=16GiB,disk=16GiB",
    "eval_every": 250,
    "work": "",  # OUT's parent (default: a temporary folder)
    "note": "",
    "out": "benchmarks/finetune_defaults.jsonl",
}


def command(cfg: dict, task: dict, model: str, out_dir: str) -> list[str]:
    """The ``zo2tier finetune`` command line of the run (without the interpreter)."""
    train, dev, test = (os.path.join(cfg["data"], f"{split}.csv") for split in ("train", "dev", "test"))
    return ["zo2tier", "finetune", "--model", model, "--train", train, "--dev", dev, "--test", test,
            "--template", task["template"], "--label-words", task["label_words"], "--budget", cfg["budget"],
            "--eval-every", str(cfg["eval_every"]), "--eval-test", "--out", out_dir, "--export", "none",
            "--no-progress", *shlex.split(cfg["flags"])]


def record(cfg: dict, task: dict, model: str, argv: list[str], out_dir: str) -> dict:
    """The run's record, from what it wrote: OUT/log.jsonl and its checkpoint's settings."""
    from zo2tier.checkpoint import read_checkpoint
    from zo2tier.train.checkpoint import checkpoint_dir

    with open(os.path.join(out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    saved = read_checkpoint(checkpoint_dir(out_dir))
    job = saved["extra_state"]["config"]
    final = next(r for r in log if r.get("event") == "final")
    train = [r for r in log if r.get("event") == "train"]
    curve = [{k: r[k] for k in ("step", "split", "acc", "n")} for r in log if r.get("event") == "eval"]
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    return {
        "kind": "finetune_defaults", "card": card(device), "date": datetime.date.today().isoformat(),
        "git_rev": git_rev(), "model": os.path.basename(model), "task": task["task"],
        "settings": {k: saved["config"][k] for k in ("estimator", "n_perturbations", "lr", "eps", "seed")}
        | {"steps": final["steps"], "batch_size": job["batch_size"], "objective": job["objective"]},
        "flags": cfg["flags"], "zero_shot_acc": final["zero_shot_acc"], "final_acc": final["finetuned_acc"],
        "kept_step": final.get("kept_step"), "ends_below_zero_shot": final["finetuned_acc"] < final["zero_shot_acc"],
        "train_seconds": final["train_seconds"], "mean_step_s": sum(r["step_s"] for r in train) / max(1, len(train)),
        "note": cfg["note"], "curve": curve, "command": shlex.join(argv),
    }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_overrides(DEFAULTS, argv)
    if not cfg["data"]:
        raise SystemExit("--data: a tools/tasks.py folder is needed")
    with open(os.path.join(cfg["data"], "task.json")) as f:
        task = json.load(f)
    model = model_dir(cfg)
    out_dir = os.path.join(cfg["work"] or tempfile.mkdtemp(prefix="ftdef-"), "out")
    args = command(cfg, task, model, out_dir)
    done = subprocess.run([sys.executable, "-m", *args], check=False)
    if done.returncode != 0:
        raise SystemExit(f"zo2tier finetune exited {done.returncode}: {shlex.join(args)}")
    rec = record(cfg, task, model, args, out_dir)
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    with open(cfg["out"], "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "curve"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
