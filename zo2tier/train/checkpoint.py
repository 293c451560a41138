"""Saving and resuming a fine-tune: one engine checkpoint, with the job's own state inside it.

``OUT/checkpoint`` is a :meth:`ZOEngine.save_checkpoint` directory (format ``zo2tier-checkpoint``): the
block table of the engine's store, the update-log tail, and ``extra_state``, where the job keeps the
settings that give the logged steps their meaning, the zero-shot accuracy and its format tag. Resuming is
:meth:`ZOEngine.resume` on it: every block already holds its updates up to its last write-back, so only the
log tail replays (no replay from step 0), and ``ZOEngine.resume("OUT/checkpoint")`` works outside the job too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

JOB_FORMAT = "zo2tier-finetune/2"
DIRNAME = "checkpoint"
_OLD_FORMAT = "zo2tier-finetune-log/1"
# Settings that change what the logged steps mean; a resume with any of them different is refused.
_MUST_MATCH = ("model", "train", "template", "label_words", "text_column", "label_column", "seed",
               "batch_size", "eps", "objective", "max_length", "dtype", "test", "dev", "encoding")
_PATHS = ("model", "train", "test", "dev")  # the same file under another spelling matches


@dataclass(frozen=True)
class Resumed:
    step: int
    zero_shot_acc: float
    lr: float | None = None  # the lr the run last stepped with (None: a checkpoint from before it was saved)


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, DIRNAME)


def exists(out: str) -> bool:
    """True if ``out`` holds a fine-tune checkpoint (of this format)."""
    refuse_old(out)
    return os.path.isfile(os.path.join(checkpoint_dir(out), "checkpoint.json"))


def saved_step(out: str) -> int | None:
    """The step ``OUT/checkpoint`` was saved after, or None where there is no fine-tune checkpoint."""
    from zo2tier.checkpoint import read_checkpoint

    try:
        extra = read_checkpoint(checkpoint_dir(out)).get("extra_state") or {}
    except (OSError, ValueError):  # none yet, or not an engine checkpoint
        return None
    return int(extra["step"]) if extra.get("format") == JOB_FORMAT else None


def refuse_old(out: str) -> None:
    """Raise for the update-log checkpoint of zo2tier 0.1 (``OUT/checkpoint.json``), which is not resumable."""
    path = os.path.join(out, "checkpoint.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            fmt = json.load(f).get("format")
        if fmt == _OLD_FORMAT:
            raise ValueError(f"{path} is a fine-tune log of an older zo2tier ({fmt}), which this one does not "
                             "resume; start over with a fresh --out (or --overwrite)")


def save(out: str, cfg: Any, engine: Any, zero_shot_acc: float, step: int) -> str:
    """Write the engine checkpoint ``OUT/checkpoint`` with the job's state after ``step`` steps (not the log's
    length: a step logs q entries, and a kept best adds undo entries); returns its path."""
    config = {k: getattr(cfg, k) for k in _MUST_MATCH}
    for k in _PATHS:  # absolute: a resume from another working directory names the same files
        if isinstance(config[k], str):
            config[k] = os.path.abspath(config[k])
    extra = {"format": JOB_FORMAT, "step": step, "zero_shot_acc": zero_shot_acc, "lr": cfg.lr, "config": config}
    return engine.save_checkpoint(checkpoint_dir(out), extra_state=extra)


def check(out: str, cfg: Any, extra_state: dict) -> Resumed:
    """The job state of a resumed engine; raises if the checkpoint belongs to a different run."""
    path = os.path.join(checkpoint_dir(out), "checkpoint.json")
    if extra_state.get("format") != JOB_FORMAT:
        raise ValueError(f"{path} was not written by `zo2tier finetune` (its extra_state has format "
                         f"{extra_state.get('format')!r}); use a fresh --out")
    for key in _MUST_MATCH:
        if key not in extra_state["config"]:  # a checkpoint from before the key was saved
            continue
        if not _same(key, extra_state["config"][key], getattr(cfg, key)):
            raise ValueError(f"--resume: {path} was written with {key}={extra_state['config'].get(key)!r} but this "
                             f"run has {key}={getattr(cfg, key)!r}; use the same value or a fresh --out")
    step = int(extra_state["step"])
    if step > cfg.steps:
        raise ValueError(f"--resume: the checkpoint is at step {step}, past --steps {cfg.steps}; raise --steps")
    return Resumed(step, float(extra_state["zero_shot_acc"]), extra_state.get("lr"))


def _same(key: str, saved: Any, given: Any) -> bool:
    if saved == given:
        return True
    if key in _PATHS and isinstance(saved, str) and isinstance(given, str):
        return (os.path.abspath(given) == saved
                or os.path.exists(saved) and os.path.exists(given) and os.path.samefile(saved, given))
    return False


def history(log_path: str, step: int) -> list[dict[str, Any]]:
    """The records of ``log.jsonl`` up to ``step`` (kept on resume; later ones belong to the lost run)."""
    if step == 0 or not os.path.isfile(log_path):
        return []
    kept = []
    with open(log_path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if rec.get("event") in ("train", "eval", "perturbations") and rec.get("step", 0) <= step:
                    kept.append(rec)
    return kept
