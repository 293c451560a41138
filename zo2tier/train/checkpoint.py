"""Resuming a fine-tune from its update log.

z is keyed by (seed, step, parameter), so the weights after step t are the starting weights plus the
replay of t logged ``(step seed, projected grad, lr, weight decay)`` entries (DESIGN §3.2). A checkpoint is
that list; on resume the engine starts from the original model with the entries pending, and each block
replays them on its first arrival. For fp32 storage this is bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from zo2tier.zo.rng import step_seed
from zo2tier.zo.update import LogEntry

FORMAT = "zo2tier-finetune-log/1"
FILENAME = "checkpoint.json"
# Settings that change what the logged steps mean; a resume with any of them different is refused.
_MUST_MATCH = ("model", "train", "template", "label_words", "text_column", "label_column", "seed",
               "batch_size", "eps", "objective", "max_length", "dtype")


@dataclass(frozen=True)
class Resumed:
    step: int
    zero_shot_acc: float
    entries: tuple[LogEntry, ...]


def save(out: str, cfg: Any, engine: Any, zero_shot_acc: float) -> str:
    """Write ``out/checkpoint.json`` atomically; returns its path."""
    path = os.path.join(out, FILENAME)
    data = {"format": FORMAT, "step": len(engine.log), "zero_shot_acc": zero_shot_acc,
            "config": {k: getattr(cfg, k) for k in _MUST_MATCH},
            "log": [e.to_json() for e in engine.log]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(out: str, cfg: Any) -> Resumed | None:
    """The checkpoint in ``out``, or None if there is none. Raises if it belongs to a different run."""
    path = os.path.join(out, FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} has format {data.get('format')!r}, not {FORMAT!r}; use a fresh --out")
    for key in _MUST_MATCH:
        if data["config"].get(key) != getattr(cfg, key):
            raise ValueError(f"--resume: {path} was written with {key}={data['config'].get(key)!r} but this run "
                             f"has {key}={getattr(cfg, key)!r}; use the same value or a fresh --out")
    entries = tuple(LogEntry.from_json(row) for row in data["log"])
    for i, e in enumerate(entries):
        if e.step != i or e.step_seed != step_seed(cfg.seed, i):
            raise ValueError(f"{path}: log entry {i} is not step {i} of seed {cfg.seed}; the file is damaged")
    if len(entries) > cfg.steps:
        raise ValueError(f"--resume: the checkpoint is at step {len(entries)}, past --steps {cfg.steps}; raise --steps")
    return Resumed(len(entries), float(data["zero_shot_acc"]), entries)


def restore(engine: Any, resumed: Resumed) -> None:
    """Make the logged steps pending on a freshly built engine; blocks replay them on arrival."""
    if engine.log:
        raise RuntimeError("restore() needs a fresh engine (its update log is not empty)")
    engine.log.extend(resumed.entries)


def history(log_path: str, step: int) -> list[dict[str, Any]]:
    """The records of ``log.jsonl`` up to ``step`` (kept on resume; later ones belong to the lost run)."""
    if step == 0 or not os.path.isfile(log_path):
        return []
    kept = []
    with open(log_path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if rec.get("event") in ("train", "eval") and rec.get("step", 0) <= step:
                    kept.append(rec)
    return kept
