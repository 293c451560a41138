"""The fine-tune job: load a model into the tiers, measure zero-shot accuracy, run MeZO, measure again.

Everything it writes goes into ``out``: ``log.jsonl`` (one record per step and per evaluation),
``checkpoint.json`` (the update log, enough to resume), ``curves.png`` and ``model/`` (the final weights as
a Hugging Face directory). Example::

    result = zo2tier.finetune(model="runs/smollm2", train="train.csv", test="test.csv", out="runs/out",
                              template="{text} It was", label_words="positive=great,negative=terrible",
                              steps=1000, lr=1e-6, budget="device=2GiB,host=4GiB,disk=20GiB",
                              disk_dir="runs/disk")
    print(result.zero_shot_acc, result.finetuned_acc)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from zo2tier.budget import BudgetLike
from zo2tier.config import MeZOConfig
from zo2tier.engine import ZOEngine
from zo2tier.train import checkpoint as ckpt
from zo2tier.train.data import (
    EncodedSet,
    LabelWords,
    Prompt,
    batch_indices,
    collate,
    encode,
    keep_labels,
    load_examples,
)
from zo2tier.train.loading import find_gguf, load_gguf, save_hf_dir
from zo2tier.train.objective import OBJECTIVES, loss_fn_for, n_correct
from zo2tier.train.progress import Meter, plot_curves

SCHEDULES = ("constant", "linear", "cosine")
EXPORTS = ("hf", "none")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FineTuneConfig:
    """Every setting of one fine-tune, checked once. See :func:`finetune` for the meaning of each."""

    model: str
    train: str
    test: str
    out: str
    template: str = "{text} It was"
    label_words: str = "positive=great,negative=terrible"
    text_column: str = "text"
    label_column: str = "label"
    dev: str | None = None
    encoding: str = "utf-8"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    objective: str = "lm"
    lr_schedule: str = "constant"
    eval_every: int = 0
    eval_max: int = 0
    eval_test: bool = False
    eval_batch_size: int = 32
    max_length: int = 64
    device: str = "cpu"
    budget: BudgetLike = "device=2GiB,host=4GiB,disk=20GiB"
    disk_dir: str | None = None
    storage: Mapping[str, str] = field(default_factory=dict)
    placement: Mapping[str, str] | None = None
    write_back_every: int = 1
    compress: str | None = None
    dtype: str | None = None
    resume: bool = False
    export: str = "hf"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batch_size", "max_length", "write_back_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name in ("eval_every", "eval_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off / means all)")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.export not in EXPORTS:
            raise ValueError(f"export={self.export!r} is unknown; use one of {', '.join(EXPORTS)}")
        if self.compress not in (None, "none", "zstd"):
            raise ValueError(f"compress={self.compress!r} is unknown; use zstd or none (disk tier only)")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; use one of {', '.join(_DTYPES)}")
        self.prompt()  # checks the template and the label words
        self.mezo()  # checks lr, eps, weight decay, seed

    def prompt(self) -> Prompt:
        return Prompt(self.template, LabelWords.parse(self.label_words))

    def mezo(self) -> MeZOConfig:
        return MeZOConfig(lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, seed=self.seed)


@dataclass(frozen=True)
class FineTuneResult:
    """What a fine-tune measured; ``summary()`` is the JSON line the CLI prints last."""

    zero_shot_acc: float
    finetuned_acc: float
    steps: int
    seconds: float
    train_seconds: float
    n_test: int
    placement: dict[str, int]
    storage: dict[str, str]
    out: str

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def finetune(**kwargs: Any) -> FineTuneResult:
    """Fine-tune a causal LM on a labelled CSV/JSONL with tiered MeZO; returns the accuracies.

    Keywords are the fields of :class:`FineTuneConfig`: ``model`` (Hugging Face directory or ``.gguf``),
    ``train``/``test`` (and optional ``dev``) files with ``text_column``/``label_column``, ``template`` with a
    ``{text}`` slot, ``label_words`` (``"positive=great,negative=terrible"``), ``objective`` (``"lm"``: LM loss
    on the label word; ``"classification"``: cross-entropy over the label words' logits), MeZO settings
    (``steps``, ``batch_size``, ``lr``, ``eps``, ``weight_decay``, ``seed``, ``lr_schedule``), tiers
    (``device``, ``budget``, ``disk_dir``, ``storage``, ``placement``, ``write_back_every``, ``compress``:
    ``"zstd"`` frames on the disk tier), evaluation
    (``eval_every``, ``eval_max``; ``eval_test``: also log test accuracy at every eval point, for curves only)
    and output (``out``, ``export``, ``resume``).
    """
    return run(FineTuneConfig(**kwargs))


def run(cfg: FineTuneConfig, *, say: Callable[[str], None] = print) -> FineTuneResult:
    """Run the job ``cfg`` describes (see :func:`finetune`)."""
    t_start = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    log_path = os.path.join(cfg.out, "log.jsonl")
    resumed = ckpt.load(cfg.out, cfg) if cfg.resume else None
    if cfg.resume and resumed is None:
        say(f"--resume: no checkpoint in {cfg.out}; starting from step 0")
    engine, tokenizer, hf_config = open_engine(cfg)
    try:
        train, test, dev = _load_sets(cfg, tokenizer)
        history = ckpt.history(log_path, resumed.step if resumed else 0)
        with open(log_path, "w") as log:
            log.writelines(json.dumps(rec) + "\n" for rec in history)
            if resumed is None:
                say(f"zero-shot: evaluating {len(test)} test examples ...")
                zero_shot = accuracy(engine, test, batch_size=cfg.eval_batch_size)
                _write(log, {"event": "eval", "step": 0, "split": "test", "acc": zero_shot, "n": len(test)})
            else:
                ckpt.restore(engine, resumed)
                zero_shot = resumed.zero_shot_acc
                say(f"resumed at step {resumed.step} from {cfg.out}")
            say(f"zero-shot test accuracy: {zero_shot:.4f}")
            t_train = time.perf_counter()
            _train(engine, cfg, train, dev or test, log, zero_shot, start=resumed.step if resumed else 0,
                   testset=test)
            train_s = time.perf_counter() - t_train
            say(f"fine-tuned: evaluating {len(test)} test examples ...")
            final = accuracy(engine, test, batch_size=cfg.eval_batch_size)
            _write(log, {"event": "eval", "step": cfg.steps, "split": "test", "acc": final, "n": len(test)})
            say(f"fine-tuned test accuracy after {cfg.steps} steps: {final:.4f}")
            if cfg.export == "hf":
                save_hf_dir(os.path.join(cfg.out, "model"), engine.state_dict(), hf_config, tokenizer)
            counts = {t: sum(1 for v in engine.placement.values() if v == t) for t in ("device", "host", "disk")}
            result = FineTuneResult(zero_shot, final, cfg.steps, time.perf_counter() - t_start, train_s,
                                    len(test), counts, dict(engine.storage), os.path.abspath(cfg.out))
            _write(log, {"event": "final", **result.summary()})
    finally:
        engine.close()
    plot_curves(log_path, os.path.join(cfg.out, "curves.png"))
    return result


# ---- pieces -----------------------------------------------------------------------------------------
def open_engine(cfg: FineTuneConfig) -> tuple[ZOEngine, Any, Any]:
    """(engine, tokenizer, model config) for ``cfg.model``: a Hugging Face directory or a GGUF file."""
    from transformers import AutoConfig, AutoTokenizer

    if not os.path.exists(cfg.model):
        raise FileNotFoundError(f"model {cfg.model!r} does not exist; give a Hugging Face directory or a .gguf")
    dtype = _DTYPES[cfg.dtype] if cfg.dtype else None
    kwargs = dict(budget=cfg.budget, disk_dir=cfg.disk_dir, device=cfg.device, config=cfg.mezo(),
                  placement=cfg.placement, storage=dict(cfg.storage) or None,
                  write_back_every=cfg.write_back_every, compress=cfg.compress)
    gguf = find_gguf(cfg.model)
    if gguf is not None:
        model, tokenizer = load_gguf(gguf, dtype=dtype)
        return ZOEngine(model, **kwargs), tokenizer, model.config
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    engine = ZOEngine.from_pretrained(cfg.model, dtype=dtype, **kwargs)
    return engine, tokenizer, AutoConfig.from_pretrained(cfg.model)


def _load_sets(cfg: FineTuneConfig, tokenizer: Any) -> tuple[EncodedSet, EncodedSet, EncodedSet | None]:
    prompt = cfg.prompt()
    sets = []
    for path in (cfg.train, cfg.test, cfg.dev):
        if path is None:
            sets.append(None)
            continue
        examples = keep_labels(load_examples(path, text_column=cfg.text_column, label_column=cfg.label_column,
                                             encoding=cfg.encoding), prompt.label_words.labels)
        if not examples:
            raise ValueError(f"{path} has no rows labelled {list(prompt.label_words.labels)}; "
                             "check --label-column and --label-words")
        sets.append(encode(examples, prompt, tokenizer, max_length=cfg.max_length))
    if len(sets[0]) < cfg.batch_size:
        raise ValueError(f"{cfg.train} has {len(sets[0])} usable rows, fewer than batch_size={cfg.batch_size}")
    return sets[0], sets[1], sets[2]


@torch.no_grad()
def accuracy(engine: ZOEngine, data: EncodedSet, *, batch_size: int = 32, max_examples: int = 0) -> float:
    """Fraction of ``data`` whose label word has the highest next-token log-probability, through the tiers."""
    n = len(data) if max_examples <= 0 else min(max_examples, len(data))
    correct = 0
    for start in range(0, n, batch_size):
        batch = collate(data, range(start, min(start + batch_size, n)))
        correct += n_correct(engine.logits(batch), batch)
    return correct / n


def lr_at(step: int, *, lr: float, steps: int, schedule: str) -> float:
    """The learning rate of step ``step`` (0-based) under ``schedule``."""
    frac = step / max(1, steps)
    if schedule == "linear":
        return lr * (1.0 - frac)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr


def _train(engine: ZOEngine, cfg: FineTuneConfig, train: EncodedSet, evalset: EncodedSet, log, zero_shot: float,
           *, start: int, testset: EncodedSet | None = None) -> None:
    loss_fn = loss_fn_for(cfg.objective)
    split = "dev" if cfg.dev else "test"
    meter = Meter(engine, total=cfg.steps, initial=start, enabled=cfg.progress)
    try:
        for step in range(start, cfg.steps):
            batch = collate(train, batch_indices(len(train), cfg.batch_size, step, seed=cfg.seed))
            lr = lr_at(step, lr=cfg.lr, steps=cfg.steps, schedule=cfg.lr_schedule)
            t0 = time.perf_counter()
            r = engine.step(batch, lr=lr, loss_fn=loss_fn)
            rec = meter.update(r, lr, int(batch["attention_mask"].sum()), time.perf_counter() - t0)
            _write(log, rec)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                acc = accuracy(engine, evalset, batch_size=cfg.eval_batch_size, max_examples=cfg.eval_max)
                _write(log, {"event": "eval", "step": step + 1, "split": split, "acc": acc,
                             "n": min(len(evalset), cfg.eval_max or len(evalset))})
                meter.note(f"{split} acc {acc:.3f}")
                if cfg.eval_test and cfg.dev:  # the held-out curve, logged for plots; nothing selects on it
                    acc = accuracy(engine, testset, batch_size=cfg.eval_batch_size)
                    _write(log, {"event": "eval", "step": step + 1, "split": "test", "acc": acc, "n": len(testset)})
                ckpt.save(cfg.out, cfg, engine, zero_shot)
    finally:
        meter.close()
    ckpt.save(cfg.out, cfg, engine, zero_shot)


def _write(log, record: dict[str, Any]) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


def main_result_line(result: FineTuneResult) -> str:
    """The one-line JSON the CLI prints last."""
    return json.dumps(result.summary())

