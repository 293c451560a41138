"""The fine-tune job: load a model into the tiers, measure zero-shot accuracy, run MeZO, measure again.

Everything it writes goes into ``out``: ``log.jsonl`` (one record per step and per evaluation),
``checkpoint/`` (an engine checkpoint, see zo2tier.train.checkpoint), ``disk/`` (the disk tier, unless
``disk_dir`` says otherwise), ``curves.png`` and ``model/`` (the final weights as a Hugging Face folder with
its tokenizer, exported block by block). ``model`` is a zo2tier store, a Hugging Face folder or a GGUF; a
store is left unchanged (its changed blocks go to the disk tier's own store) unless ``in_place``.
Example::

    result = zo2tier.finetune(model="runs/smollm2", train="train.csv", test="test.csv", out="runs/out",
                              template="{text} It was", label_words="positive=great,negative=terrible",
                              steps=1000, lr=1e-6, budget="device=2GiB,host=4GiB,disk=20GiB",
                              disk_dir="runs/disk")
    print(result.zero_shot_acc, result.finetuned_acc)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from zo2tier.budget import BudgetLike, TierBudget
from zo2tier.checkpoint import checkpoint_store, is_store, read_checkpoint
from zo2tier.config import MeZOConfig
from zo2tier.engine import ZOEngine
from zo2tier.model_ref import HF_FILES_DIR, ModelRef, copy_tokenizer_files, max_positions, model_ref
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
from zo2tier.train.objective import OBJECTIVES, loss_fn_for, n_correct
from zo2tier.train.progress import Meter, plot_curves
from zo2tier.train.schedule import SCHEDULES, lr_at
from zo2tier.zo.estimators import ESTIMATORS

EXPORTS = ("hf", "none")
KEEPS = ("best", "last")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_BUDGET = "device=2GiB,host=4GiB,disk=20GiB"


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
    lr: float | None = None  # None: the estimator's default_lr
    eps: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    estimator: str = "mezo"
    perturbations: int | str | None = None  # None: the estimator's default_perturbations
    objective: str = "lm"
    lr_schedule: str = "constant"
    eval_every: int = 0
    eval_max: int = 0
    eval_test: bool = False
    eval_batch_size: int = 32
    max_length: int = 64
    device: str = "cpu"
    budget: BudgetLike | None = None  # None: DEFAULT_BUDGET, or on resume the checkpoint's
    disk_dir: str | None = None
    storage: Mapping[str, str] = field(default_factory=dict)
    placement: Mapping[str, str] | None = None
    write_back_every: int | None = None  # None: the engine's measured default per tier
    compress: str | None = None
    dtype: str | None = None
    resume: bool = False
    overwrite: bool = False
    in_place: bool = False
    export: str = "hf"
    keep: str = "best"
    progress: bool = True
    # whether lr / perturbations were given, before __post_init__ filled in the estimator's defaults: a resume
    # without them goes on with the checkpoint's, not with a default that may differ from what the run used
    lr_given: bool = field(default=False, init=False, repr=False, compare=False)
    perturbations_given: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is unknown; use one of {', '.join(sorted(ESTIMATORS))}")
        object.__setattr__(self, "lr_given", self.lr is not None)
        object.__setattr__(self, "perturbations_given", self.perturbations is not None)
        if self.lr is None:
            object.__setattr__(self, "lr", ESTIMATORS[self.estimator].default_lr)
        if self.perturbations is None:
            object.__setattr__(self, "perturbations", ESTIMATORS[self.estimator].default_perturbations)
        for name in ("steps", "batch_size", "eval_batch_size", "max_length", "write_back_every"):
            value = getattr(self, name)
            if name == "write_back_every" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other; pass one of them")
        for name in ("eval_every", "eval_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off / means all)")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.keep not in KEEPS:
            raise ValueError(f"keep={self.keep!r} is unknown; use one of {', '.join(KEEPS)}")
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
        return MeZOConfig(lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, seed=self.seed,
                          estimator=self.estimator, n_perturbations=self.perturbations)


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
    kept_step: int | None = None  # the step whose weights were kept (keep="best" with a dev split)
    perturbations: int = 1  # q each step ran (the planner's choice under --perturbations auto)

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def finetune(**kwargs: Any) -> FineTuneResult:
    """Fine-tune a causal LM on a labelled CSV/JSONL with tiered MeZO; returns the accuracies.

    Keywords are the fields of :class:`FineTuneConfig`: ``model`` (a zo2tier store, a Hugging Face folder or a
    ``.gguf``; a store is left unchanged unless ``in_place``),
    ``train``/``test`` (and optional ``dev``) files with ``text_column``/``label_column``, ``template`` with a
    ``{text}`` slot, ``label_words`` (``"positive=great,negative=terrible"``), ``objective`` (``"lm"``: LM loss
    on the label word; ``"classification"``: cross-entropy over the label words' logits), MeZO settings
    (``steps``, ``batch_size``, ``lr``, ``eps``, ``weight_decay``, ``seed``, ``lr_schedule``), tiers
    (``device``, ``budget``, ``disk_dir``, ``storage``, ``placement``, ``write_back_every``, ``compress``:
    ``"zstd"`` frames on the disk tier), evaluation
    (``eval_every``, ``eval_max``; ``eval_test``: also log test accuracy at every eval point, for curves only)
    and output (``out``, ``export``, ``resume``; ``overwrite`` replaces an earlier run in ``out``).

    ``keep="best"`` (the default) with a ``dev`` file: dev is evaluated before training, every ``eval_every``
    steps and after the last step, and the weights of the best of these are the ones tested and exported
    (on a tie the last step's, else the earliest's, zero-shot included), so a fine-tune never ends below its
    zero-shot dev accuracy.
    The updates after that step are undone by appending their inverses to the log (``ZOEngine.revert_to``),
    so nothing is reloaded. A later ``resume`` with more steps goes on from the kept weights. Without ``dev``,
    or with ``keep="last"``, the last step's weights are kept (test accuracy never selects anything).
    """
    return run(FineTuneConfig(**kwargs))


def run(cfg: FineTuneConfig, *, say: Callable[[str], None] = print) -> FineTuneResult:
    """Run the job ``cfg`` describes (see :func:`finetune`)."""
    t_start = time.perf_counter()
    ref = model_ref(cfg.model)
    tokenizer = ref.tokenizer()
    earlier = _check_out(cfg)
    _check_disk_dir(cfg, ref)
    _check_max_length(cfg, ref)
    train, test, dev = _load_sets(cfg, tokenizer, say)  # every input is checked before --overwrite removes a run
    if cfg.eval_test and (dev is None or not cfg.eval_every):
        say("--eval-test adds nothing: " + ("without --dev every eval point already scores the test split"
                                             if dev is None else "--eval-every 0 makes no eval points"))
    made_out = not os.path.isdir(cfg.out)
    resuming = _prepare_out(cfg, earlier, say)
    log_path = os.path.join(cfg.out, "log.jsonl")
    try:
        engine, resumed = (_resume_engine(cfg, say) if resuming else (open_engine(cfg, ref), None))
    except BaseException:
        if made_out:  # nothing of a run that never started is left behind
            shutil.rmtree(cfg.out, ignore_errors=True)
        raise
    if resumed is not None:
        cfg = _resumed_settings(cfg, engine, resumed, say)
    try:
        if not resuming:
            _give_store_a_tokenizer(engine, ref)
        history = ckpt.history(log_path, resumed.step if resumed else 0)
        with open(log_path, "w") as log:
            log.writelines(json.dumps(rec) + "\n" for rec in history)
            if resumed is None:
                say(f"zero-shot: evaluating {len(test)} test examples ...")
                zero_shot = accuracy(engine, test, batch_size=cfg.eval_batch_size, progress=cfg.progress)
                _write(log, {"event": "eval", "step": 0, "split": "test", "acc": zero_shot, "n": len(test)})
                if dev is not None and cfg.keep == "best":
                    _eval_dev(engine, cfg, dev, log, 0)
            else:
                zero_shot = resumed.zero_shot_acc
                say(f"resumed at step {resumed.step} from {ckpt.checkpoint_dir(cfg.out)}")
            say(f"zero-shot test accuracy: {zero_shot:.4f}")
            t_train = time.perf_counter()
            _train(engine, cfg, train, dev or test, log, zero_shot, start=resumed.step if resumed else 0,
                   testset=test, say=say)
            train_s = time.perf_counter() - t_train
            _give_store_a_tokenizer(engine, ref)  # with every layer in memory, the checkpoint's store is the one
            kept = None
            if dev is not None and cfg.keep == "best":
                kept = _keep_best(engine, cfg, dev, log, say)
                if kept != cfg.steps:  # the checkpoint holds the kept weights: a resume goes on from them
                    ckpt.save(cfg.out, cfg, engine, zero_shot, cfg.steps)
            # every pending update written back (a bf16/int8 tier rounds it now, not later): the weights tested
            # are those exported and those `zo2tier export OUT/disk` reads
            engine.flush()
            say(f"fine-tuned: evaluating {len(test)} test examples ...")
            final = accuracy(engine, test, batch_size=cfg.eval_batch_size, progress=cfg.progress)
            _write(log, {"event": "eval", "step": cfg.steps, "split": "test", "acc": final, "n": len(test)})
            at = f"the weights of step {kept}" if kept is not None and kept != cfg.steps else f"{cfg.steps} steps"
            say(f"fine-tuned test accuracy ({at}): {final:.4f}")
            if cfg.export == "hf":
                export_with_tokenizer(engine, os.path.join(cfg.out, "model"), ref)
            counts = {t: sum(1 for v in engine.placement.values() if v == t) for t in ("device", "host", "disk")}
            result = FineTuneResult(zero_shot, final, cfg.steps, time.perf_counter() - t_start, train_s,
                                    len(test), counts, dict(engine.storage), os.path.abspath(cfg.out), kept,
                                    engine.estimator.n_perturbations)
            _write(log, {"event": "final", **result.summary()})
    finally:
        engine.close()
    plot_curves(log_path, os.path.join(cfg.out, "curves.png"))
    return result


# ---- pieces -----------------------------------------------------------------------------------------
_OURS = ("log.jsonl", "checkpoint", "checkpoint.json", "model", "curves.png")


def _check_out(cfg: FineTuneConfig) -> list[str]:
    """The files of an earlier run in ``out``; refuses a file as ``out``, and an earlier run unless ``resume``
    or ``overwrite``. Changes nothing."""
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; give a directory (new, or an earlier run's to --resume)")
    ours = [f for f in _OURS if os.path.exists(os.path.join(out, f))]
    model = os.path.join(out, "model")
    if os.path.isdir(model) and os.listdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"--out {out!r}: its model/ folder holds files a fine-tune did not write (the run exports "
                         "there); pick another --out")
    if ours and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out {out!r} already holds a fine-tune ({', '.join(ours)}); pass --resume to continue "
                         "it, --overwrite to start over, or another --out")
    return ours


def _check_disk_dir(cfg: FineTuneConfig, ref: ModelRef) -> None:
    """Refuse a disk-tier folder that holds a store a fresh run would replace: the model's own (that is
    ``in_place``), or another one unless ``overwrite``."""
    if cfg.in_place or (cfg.resume and ckpt.exists(cfg.out)):
        return
    disk_dir = cfg.disk_dir or os.path.join(cfg.out, "disk")
    if not is_store(disk_dir):
        return
    if ref.kind == "store" and os.path.samefile(disk_dir, ref.path):
        raise ValueError(f"--disk-dir {disk_dir!r} is the model's store, which a fine-tune leaves unchanged; pass "
                         "--in-place to fine-tune the store itself, or give another --disk-dir")
    if not cfg.overwrite:
        raise ValueError(f"--disk-dir {disk_dir!r} already holds a zo2tier store (a converted model or an earlier "
                         "run's disk tier); give an empty or new folder, or --overwrite to replace it")


def _prepare_out(cfg: FineTuneConfig, earlier: list[str], say: Callable[[str], None]) -> bool:
    """Make ``out`` ready once every input is checked; True if the run resumes from its checkpoint.
    ``overwrite`` removes ``earlier`` (what :func:`_check_out` found: only what a fine-tune writes)."""
    out = cfg.out
    if cfg.overwrite:
        for name in earlier:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    os.makedirs(out, exist_ok=True)
    if cfg.resume and not ckpt.exists(out):
        say(f"--resume: no checkpoint in {out}; starting from step 0")
        return False
    return cfg.resume


def open_engine(cfg: FineTuneConfig, ref: ModelRef | None = None) -> ZOEngine:
    """The engine for ``cfg.model`` (a store, a Hugging Face folder or a GGUF), streamed into its tiers.

    The disk tier lives in ``cfg.disk_dir`` (default ``OUT/disk``). A store is only read: the blocks a run
    changes are written to the disk tier's own store, unless ``cfg.in_place``."""
    ref = ref or model_ref(cfg.model)
    if ref.kind == "config":
        raise ValueError(f"model {ref.path!r} is a config without weights; `zo2tier convert {ref.path} STORE` "
                         "gives it random weights, then fine-tune STORE")
    if cfg.in_place and ref.kind != "store":
        raise ValueError(f"--in-place changes a zo2tier store, but {ref.path!r} is a {ref.kind}; drop --in-place "
                         f"or convert it first (`zo2tier convert {ref.path} STORE`)")
    disk_dir = ref.path if cfg.in_place else (cfg.disk_dir or os.path.join(cfg.out, "disk"))
    return ZOEngine.from_pretrained(
        ref.gguf or ref.path, dtype=_DTYPES[cfg.dtype] if cfg.dtype else None, budget=cfg.budget or DEFAULT_BUDGET,
        disk_dir=disk_dir, device=cfg.device, config=cfg.mezo(), placement=cfg.placement,
        storage=dict(cfg.storage) or None, write_back_every=cfg.write_back_every, compress=cfg.compress)


def _resumed_settings(cfg: FineTuneConfig, engine: ZOEngine, resumed: ckpt.Resumed,
                      say: Callable[[str], None]) -> FineTuneConfig:
    """``cfg`` with the checkpoint's lr and q where the resume gave none (a given lr wins: it may be lowered)."""
    saved = engine.config
    lr = cfg.lr if cfg.lr_given else resumed.lr if resumed.lr is not None else saved.lr
    q = cfg.perturbations if cfg.perturbations_given else saved.n_perturbations
    if (lr, q) != (cfg.lr, cfg.perturbations):
        say(f"resumed with the checkpoint's lr {lr:g} and {q} perturbation(s) per step")
    saved_lr = resumed.lr if resumed.lr is not None else saved.lr
    if cfg.lr_given and lr != saved_lr:
        say(f"--resume: steps from now on use --lr {lr:g} (the run so far used {saved_lr:g})")
    return dataclasses.replace(cfg, lr=lr, perturbations=q)


def _give_store_a_tokenizer(engine: ZOEngine, ref: ModelRef) -> None:
    """The engine's own store (the disk tier's ``OUT/disk``, or ``OUT/checkpoint/store`` when every layer is in
    memory) gets the model's tokenizer (``STORE/hf``), so that ``zo2tier export`` and ``zo2tier generate`` work
    on it as on a converted store."""
    if engine.store is None or ref.kind == "store" and os.path.samefile(engine.store.path, ref.path):
        return
    hf_dir = os.path.join(engine.store.path, HF_FILES_DIR)
    if not os.path.isdir(hf_dir):
        copy_tokenizer_files(ref, hf_dir)


def _resume_engine(cfg: FineTuneConfig, say: Callable[[str], None]) -> tuple[ZOEngine, ckpt.Resumed]:
    """The engine of ``OUT/checkpoint``, where it stopped, and the job's state saved with it. Tier settings
    this run gives (budget, placement, storage, write-back, compression) re-plan the tiers; the disk tier's
    folder is the checkpoint's."""
    path = ckpt.checkpoint_dir(cfg.out)
    saved = read_checkpoint(path)
    store = checkpoint_store(path, saved)
    if cfg.disk_dir is not None and os.path.abspath(cfg.disk_dir) != os.path.abspath(store):
        raise ValueError(f"--resume: {path} keeps its disk tier in {store}, not --disk-dir {cfg.disk_dir!r}; drop "
                         "--disk-dir (or give that folder)")
    given = {"budget": cfg.budget, "placement": cfg.placement, "storage": dict(cfg.storage) or None,
             "write_back_every": cfg.write_back_every, "compress": cfg.compress}
    given = {k: v for k, v in given.items() if v is not None}
    # the saved placement is the old budget's plan: a new budget plans anew unless a placement is given
    if ("budget" in given and "placement" not in given
            and TierBudget.parse(given["budget"]).as_dict() != saved["engine"]["budget"]):
        given["placement"] = None
    if saved["config"]["estimator"] != cfg.estimator:
        raise ValueError(f"--resume: {path} was trained with estimator={saved['config']['estimator']!r} but this "
                         f"run has {cfg.estimator!r}; pass --estimator {saved['config']['estimator']} or use a "
                         "fresh --out")
    resumed = ckpt.check(cfg.out, cfg, saved["extra_state"])  # before the engine touches the store
    engine = ZOEngine.resume(path, device=cfg.device, **given)
    changed = _changed_tiers(saved["engine"], engine, given)
    if changed:
        say(f"--resume: the tiers follow this run's {', '.join(changed)} (the checkpoint had other values)")
    return engine, resumed


def export_with_tokenizer(engine: ZOEngine, out_dir: str, ref: ModelRef) -> str:
    """The engine's weights (streamed block by block) plus ``ref``'s tokenizer files, as a Hugging Face
    folder; an earlier export in ``out_dir`` is replaced once the new one is whole."""
    partial = out_dir.rstrip("/") + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    engine.export(partial)
    copy_tokenizer_files(ref, partial)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir


def _changed_tiers(saved: dict[str, Any], engine: ZOEngine, given: dict[str, Any]) -> list[str]:
    """The tier settings ``given`` to a resume that differ from the checkpoint's (``saved["engine"]``)."""
    now = {"budget": engine.budget.as_dict(),
           "placement": dict(engine.placement), "storage": dict(engine.storage),
           "write_back_every": engine.write_back_every,
           "compress": None if engine.compress is None else dataclasses.asdict(engine.compress)}
    return [f"--{k.replace('_', '-')}" for k, v in given.items()
            if v is not None and json.loads(json.dumps(now[k])) != saved.get(k)]


def _check_max_length(cfg: FineTuneConfig, ref: ModelRef) -> None:
    """Refuse a ``max_length`` past the model's positions (a learned position table would fail mid-run)."""
    if ref.kind == "config":
        return
    limit = max_positions(ref.config_dict())
    if limit is not None and cfg.max_length > limit:
        raise ValueError(f"--max-length {cfg.max_length} exceeds the model's {limit} positions; lower it to "
                         f"{limit} or less")


def _load_sets(cfg: FineTuneConfig, tokenizer: Any,
               say: Callable[[str], None] = print) -> tuple[EncodedSet, EncodedSet, EncodedSet | None]:
    prompt = cfg.prompt()
    sets = []
    for path in (cfg.train, cfg.test, cfg.dev):
        if path is None:
            sets.append(None)
            continue
        rows = load_examples(path, text_column=cfg.text_column, label_column=cfg.label_column,
                             encoding=cfg.encoding)
        examples = keep_labels(rows, prompt.label_words.labels)
        if not examples:
            found = sorted({ex.label for ex in rows})
            raise ValueError(f"{path} has {len(rows)} rows but none labelled {list(prompt.label_words.labels)} "
                             f"(its {cfg.label_column!r} column holds {found[:6]}); check --label-column and "
                             "--label-words")
        if len(examples) < len(rows):
            other = sorted({ex.label for ex in rows} - set(prompt.label_words.labels))
            say(f"{path}: {len(rows) - len(examples)} of {len(rows)} rows are left out: their labels {other[:6]} "
                "have no label word (--label-words)")
        sets.append(encode(examples, prompt, tokenizer, max_length=cfg.max_length))
    if len(sets[0]) < cfg.batch_size:
        raise ValueError(f"{cfg.train} has {len(sets[0])} usable rows, fewer than batch_size={cfg.batch_size}")
    return sets[0], sets[1], sets[2]


@torch.no_grad()
def accuracy(engine: ZOEngine, data: EncodedSet, *, batch_size: int = 32, max_examples: int = 0,
             progress: bool = False) -> float:
    """Fraction of ``data`` whose label word has the highest next-token log-probability, through the tiers."""
    from tqdm import tqdm

    n = len(data) if max_examples <= 0 else min(max_examples, len(data))
    correct = 0
    with tqdm(total=n, unit="ex", desc="eval", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            batch = collate(data, range(start, min(start + batch_size, n)))
            correct += n_correct(engine.logits(batch), batch)
            bar.update(batch["input_ids"].shape[0])
    return correct / n


def _train(engine: ZOEngine, cfg: FineTuneConfig, train: EncodedSet, evalset: EncodedSet, log, zero_shot: float,
           *, start: int, testset: EncodedSet | None = None, say: Callable[[str], None] = print) -> None:
    loss_fn = loss_fn_for(cfg.objective)
    split = "dev" if cfg.dev else "test"
    meter = Meter(engine, total=cfg.steps, initial=start, enabled=cfg.progress)
    try:
        for step in range(start, cfg.steps):
            batch = collate(train, batch_indices(len(train), cfg.batch_size, step, seed=cfg.seed))
            lr = lr_at(step, lr=cfg.lr, steps=cfg.steps, schedule=cfg.lr_schedule)
            t0 = time.perf_counter()
            r = engine.step(batch, lr=lr, loss_fn=loss_fn)
            rec = meter.update(step + 1, r, lr, int(batch["attention_mask"].sum()), time.perf_counter() - t0)
            if step == start and engine.auto_perturbations:
                _announce_auto(engine, log, say, step + 1)
            _write(log, rec)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                acc = accuracy(engine, evalset, batch_size=cfg.eval_batch_size, max_examples=cfg.eval_max,
                               progress=cfg.progress)
                _write(log, {"event": "eval", "step": step + 1, "split": split, "acc": acc,
                             "n": min(len(evalset), cfg.eval_max or len(evalset)), "log_entries": len(engine.log)})
                meter.note(f"step {step + 1}: {split} acc {acc:.3f}")
                if cfg.eval_test and cfg.dev:  # the held-out curve, logged for plots; nothing selects on it
                    acc = accuracy(engine, testset, batch_size=cfg.eval_batch_size)
                    _write(log, {"event": "eval", "step": step + 1, "split": "test", "acc": acc, "n": len(testset)})
                ckpt.save(cfg.out, cfg, engine, zero_shot, step + 1)
    finally:
        meter.close()
    ckpt.save(cfg.out, cfg, engine, zero_shot, cfg.steps)


def _announce_auto(engine: ZOEngine, log, say: Callable[[str], None], step: int) -> None:
    """Say and log what ``--perturbations auto`` chose at the run's first step (the batch's shape decides)."""
    choice, q = engine.auto_perturbations, engine.estimator.n_perturbations
    say(f"--perturbations auto: q={q} for {engine.config.estimator} (stopped by {choice.limit}; predicted step "
        f"{choice.prediction.step_s:.3f} s, bound by {choice.prediction.bound})")
    _write(log, {"event": "perturbations", "step": step, "q": q, "limit": choice.limit,
                 "predicted_step_s": choice.prediction.step_s, "bound": choice.prediction.bound})


def _eval_dev(engine: ZOEngine, cfg: FineTuneConfig, dev: EncodedSet, log, step: int) -> float:
    """Dev accuracy at ``step`` (all of dev: it selects the kept weights), logged with the log's length."""
    acc = accuracy(engine, dev, batch_size=cfg.eval_batch_size, progress=cfg.progress)
    _write(log, {"event": "eval", "step": step, "split": "dev", "acc": acc, "n": len(dev),
                 "log_entries": len(engine.log)})
    return acc


def _keep_best(engine: ZOEngine, cfg: FineTuneConfig, dev: EncodedSet, log, say: Callable[[str], None]) -> int:
    """``keep="best"``: dev after the last step, then undo the updates after the best dev evaluation of the
    run (``log.jsonl``: those before a resume too). Returns the step whose weights are kept."""
    final = _eval_dev(engine, cfg, dev, log, cfg.steps)
    with open(os.path.join(cfg.out, "log.jsonl")) as f:  # this run's evaluations, the resumed ones too
        evals = [r for r in map(json.loads, f) if r.get("event") == "eval" and r.get("split") == "dev"
                 and "log_entries" in r and (cfg.eval_max == 0 or r["n"] == len(dev))]
    best = max(evals, key=lambda r: (r["acc"], -r["step"]))
    if best["step"] == cfg.steps or best["acc"] <= final:
        return cfg.steps
    try:
        undone = engine.revert_to(best["log_entries"])
    except ValueError:  # the best evaluation lies before a resume whose checkpoint folded the steps after it
        say(f"the best dev evaluation (step {best['step']}, {best['acc']:.4f}) lies before the resumed checkpoint's "
            f"folded steps, which cannot be undone; keeping the weights of step {cfg.steps} ({final:.4f})")
        return cfg.steps
    _write(log, {"event": "keep_best", "step": best["step"], "dev_acc": best["acc"], "final_dev_acc": final,
                 "entries_undone": undone})
    say(f"keeping the weights of step {best['step']} (dev accuracy {best['acc']:.4f}, {final:.4f} after step "
        f"{cfg.steps}): the {cfg.steps - best['step']} steps after it are undone")
    return best["step"]


def _write(log, record: dict[str, Any]) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


def main_result_line(result: FineTuneResult) -> str:
    """The one-line JSON the CLI prints last."""
    return json.dumps(result.summary())

