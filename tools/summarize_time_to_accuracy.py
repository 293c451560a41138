"""Summarize tools/bench_time_to_accuracy.py records: targets, steps and seconds to target, the issue's bars, plots.

    python tools/summarize_time_to_accuracy.py --records=benchmarks/time_to_accuracy.jsonl \\
        --png=benchmarks/time_to_accuracy.png --summary=benchmarks/time_to_accuracy_summary.json

Per task:

- **target**: MeZO-SGD's (estimator mezo, q = 1) mean final test accuracy, at its learning rate with the best
  mean final *dev* accuracy (``--mezo_lr`` fixes it instead); ``--targets=tweets=0.790`` takes a task's target
  from longer MeZO-SGD runs on the same splits instead (benchmarks/finetune.jsonl: 5,000 steps, mean 0.790).
- **seconds per step**: from the ``time_disk`` records (every layer on disk, same estimator and q), their median
  step (``--clock=mean``: the mean); a method without one falls back to its own runs' measured seconds
  (marked ``"clock": "run"``).
- per run: ``steps_to_target`` (first eval point whose test accuracy reaches the target) and
  ``seconds_to_target`` = steps × disk seconds per step; ``acc_in_mezo_budget``: the test accuracy at the last
  eval point within MeZO-SGD's wall-clock (its steps × its disk seconds per step); ``covers_mezo_budget``: the
  run lasted that long (if not, its last accuracy stands in and the accuracy bar is not met).
- per method and lr: means over seeds. A run recorded twice (a short run, then the same seed continued
  further) counts once, at its longest. Runs with layers off the GPU are their own methods ("... on disk").
- **lr by dev**: each new method's learning rate is the one with the best mean final *dev* accuracy among its
  lrs run with at least :data:`MIN_SEEDS` seeds (every layer on the GPU), as MeZO-SGD's is; the best new
  method is, among those, the one with the lowest mean seconds to target.
- ``--annotate=1``: every accuracy record in the ``--records`` files gets its task's ``target_acc``,
  ``steps_to_target`` and ``seconds_to_target`` (on the disk clock, ``seconds_to_target_clock`` says which;
  null if never reached), as the issue's record keys ask; the files are rewritten in place, nothing else changes.
- **bars** (issue 18): best mean seconds_to_target ≤ 1/3 of MeZO-SGD's; accuracy within MeZO's wall-clock ≥
  MeZO's + 2 points; on the tweets, final gain over zero-shot ≥ 8 points. ``equal_clock``: where the new
  method's runs end before MeZO's budget, both methods' mean test accuracy at the clock the shortest of them
  covered (each run's last eval point within it), a comparison at equal wall-clock that the runs do cover.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))
from _options import parse_overrides

DEFAULTS = {"records": "benchmarks/time_to_accuracy.jsonl", "png": "", "summary": "", "mezo_lr": -1.0,
            "targets": "",  # e.g. "tweets=0.790": a task's target from longer MeZO-SGD runs elsewhere
            "clock": "median",  # the time_disk statistic: median (robust to a stalled step) or mean
            "mezo_method": "",  # the MeZO-SGD runs by method label, e.g. "mezo q=1 (5000 steps)" (default: all)
            "annotate": 0}  # 1: write each task's target and every run's steps/seconds to it into the records files
MIN_SEEDS = 3
SPEEDUP_BAR = 3.0
ACC_BAR = 0.02
GAIN_BAR = 0.08


def load(path: str, clock: str = "median") -> tuple[list[dict], dict[tuple[str, int], float]]:
    """(accuracy records, disk seconds per step by (estimator, q)) of ``path`` (several: comma-separated); the
    last time_disk record of a pair wins (one of a q asked for by name over one auto chose; a control run with the
    copies one at a time on CUDA, ``stack_control: true``, never). ``clock``: its ``median`` or ``mean`` seconds per step."""
    if clock not in ("median", "mean"):
        raise ValueError(f"clock={clock!r}: use median or mean")
    runs, disk, explicit = [], {}, set()
    lines = []
    for one in path.split(","):
        with open(one) as f:
            lines += f.readlines()
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "time_disk":
            if rec.get("stack_control"):  # the A/B's control (--stack_bytes=0): copies one at a time on CUDA
                continue
            key = (rec["estimator"], int(rec["q"]))
            if rec.get("q_requested") == "auto" and key in explicit:  # a q asked for by name wins over auto's
                continue
            explicit.update([key] if rec.get("q_requested") != "auto" else [])
            disk[key] = rec["median_seconds_per_step" if clock == "median" else "seconds_per_step"]
        elif rec.get("kind", "accuracy") == "accuracy":
            runs.append(rec)
    return longest(runs), disk


def longest(runs: list[dict]) -> list[dict]:
    """Each run once: of records of the same task, method, lr, seed and placement (a run continued further
    in a later sweep repeats its first steps exactly), the one with the most steps; the order of first sight."""
    best: dict[tuple, dict] = {}
    for r in runs:
        key = (r["task"], r["method"], int(r["q"]), r["lr"], r["seed"], r.get("placement", "device"))
        if key not in best or r["steps"] > best[key]["steps"]:
            best[key] = r
    return list(best.values())


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _label(rec: dict) -> str:
    """A run's method label; an auto one with the q it ran (the planner's choice changes between versions)."""
    return rec["method"].replace("q=auto", f"q=auto:{int(rec['q'])}")


def _key(rec: dict) -> str:
    """A method's name: its label, lr and placement."""
    where = rec.get("placement", "device")
    return f"{_label(rec)} lr={rec['lr']:g}" + ("" if where == "device" else f" on {where}")


def _is_mezo(rec: dict) -> bool:
    return rec["estimator"] == "mezo" and int(rec["q"]) == 1


def summarize_task(runs: list[dict], disk: dict, *, mezo_lr: float = -1.0, target: float | None = None,
                   mezo_method: str = "") -> dict:
    """The summary of one task's runs (see the module docstring). ``mezo_method``: the MeZO-SGD runs are
    those of this method label, if the task has any (e.g. longer runs recorded elsewhere)."""
    mezo_by_lr = defaultdict(list)
    chosen = [r for r in runs if _is_mezo(r) and r["method"] == mezo_method]
    for r in chosen or runs:
        if _is_mezo(r):
            mezo_by_lr[r["lr"]].append(r)
    if not mezo_by_lr:
        raise ValueError(f"task {runs[0]['task']!r} has no MeZO-SGD run (estimator mezo, q 1): no target")
    lr = mezo_lr if mezo_lr >= 0 else max(
        mezo_by_lr, key=lambda x: _mean(r["final_dev_acc"] for r in mezo_by_lr[x]) or 0)
    mezo = mezo_by_lr[lr]
    target = _mean(r["final_acc"] for r in mezo) if target is None else target
    mezo_sps, _ = _seconds_per_step(mezo[0], disk)
    budget_s = max(r["steps"] for r in mezo) * mezo_sps
    per_run = []
    for r in runs:
        sps, clock = _seconds_per_step(r, disk)
        steps, seconds = _to_target(r, target, sps)
        per_run.append({"method": _key(r), "seed": r["seed"], "q": r["q"], "seconds_per_step": sps, "clock": clock,
                        "zero_shot_acc": r["zero_shot_acc"], "final_acc": r["final_acc"],
                        "final_dev_acc": r.get("final_dev_acc"), "test_at_best_dev": r.get("test_at_best_dev"),
                        "steps_to_target": steps, "seconds_to_target": seconds,
                        "disk_seconds": r["steps"] * sps, "covers_mezo_budget": r["steps"] * sps >= budget_s - 1e-9,
                        "acc_in_mezo_budget": _acc_at(r["curve"], sps, budget_s)})
    methods = {}
    for name in sorted({p["method"] for p in per_run}):
        rows = [p for p in per_run if p["method"] == name]
        first = next(r for r in runs if _key(r) == name)
        methods[name] = {
            "method": _label(first), "lr": first["lr"], "placement": first.get("placement", "device"),
            "n_runs": len(rows), "q": rows[0]["q"], "seconds_per_step": rows[0]["seconds_per_step"],
            "clock": rows[0]["clock"], "n_reached": sum(p["steps_to_target"] is not None for p in rows),
            "mean_final_acc": _mean(p["final_acc"] for p in rows),
            "mean_final_dev_acc": _mean(p["final_dev_acc"] for p in rows),
            "min_disk_seconds": min(p["disk_seconds"] for p in rows),
            "mean_gain_over_zero_shot": _mean(p["final_acc"] - p["zero_shot_acc"] for p in rows),
            "mean_steps_to_target": _mean(p["steps_to_target"] for p in rows),
            "mean_seconds_to_target": _mean(p["seconds_to_target"] for p in rows),
            "mean_acc_in_mezo_budget": _mean(p["acc_in_mezo_budget"] for p in rows),
            "covers_mezo_budget": all(p["covers_mezo_budget"] for p in rows)}
    mezo_name = _key(mezo[0])
    bars = _bars(methods, mezo_name, runs[0]["task"])
    if bars.get("best") and not bars["acc_covers_mezo_budget"]:
        bars["equal_clock"] = _equal_clock(runs, disk, bars["best"], mezo_name)
    return {"target_acc": target, "mezo_method": mezo_name, "mezo_budget_s": budget_s, "methods": methods,
            "lr_by_dev": lr_by_dev(methods, mezo_name), "bars": bars, "runs": per_run}


def lr_by_dev(methods: dict, mezo_name: str) -> dict[str, str]:
    """Per new method (every layer on the GPU): its (method, lr) key with the best mean final dev accuracy,
    among its lrs run with at least MIN_SEEDS seeds."""
    out: dict[str, str] = {}
    for name, m in methods.items():
        if name == mezo_name or m["method"].startswith("mezo q=1") or m["placement"] != "device":
            continue
        if m["n_runs"] < MIN_SEEDS or m["mean_final_dev_acc"] is None:
            continue
        held = out.get(m["method"])
        if held is None or m["mean_final_dev_acc"] > methods[held]["mean_final_dev_acc"]:
            out[m["method"]] = name
    return out


def _acc_at(curve: list[dict], sps: float, seconds: float) -> float:
    """Test accuracy at the last eval point within ``seconds`` of a run's disk clock (step 0 always is)."""
    return [p for p in curve if p["step"] * sps <= seconds + 1e-9][-1]["test_acc"]


def _to_target(rec: dict, target: float, sps: float) -> tuple[int | None, float | None]:
    """(steps, seconds at ``sps`` a step) to the first eval point whose test accuracy reaches ``target``;
    (None, None) if none does."""
    hit = next((p for p in rec["curve"] if p["test_acc"] >= target), None)
    return (hit["step"], hit["step"] * sps) if hit else (None, None)


def _equal_clock(runs: list[dict], disk: dict, best: str, mezo_name: str) -> dict:
    """Mean test accuracy of ``best`` and of MeZO-SGD at the disk clock the shortest of ``best``'s runs covered."""
    mine = [r for r in runs if _key(r) == best]
    mezo = [r for r in runs if _key(r) == mezo_name]
    seconds = min(r["steps"] * _seconds_per_step(r, disk)[0] for r in mine)
    new = _mean(_acc_at(r["curve"], _seconds_per_step(r, disk)[0], seconds) for r in mine)
    old = _mean(_acc_at(r["curve"], _seconds_per_step(r, disk)[0], seconds) for r in mezo)
    return {"seconds": seconds, "new_acc": new, "mezo_acc": old, "delta": new - old, "met": new - old >= ACC_BAR}


def _seconds_per_step(rec: dict, disk: dict) -> tuple[float, str]:
    key = (rec["estimator"], int(rec["q"]))
    if key in disk:
        return disk[key], "disk"
    return rec["seconds"] / max(1, rec["steps"]), "run"


def _bars(methods: dict, mezo_name: str, task: str) -> dict:
    """The issue's bars for the best new method: of each method's lr chosen by dev (:func:`lr_by_dev`), the one
    with the lowest mean seconds to target, all its seeds reaching it (on a tie, the highest final accuracy)."""
    mezo = methods[mezo_name]
    new = {k: methods[k] for k in lr_by_dev(methods, mezo_name).values()}
    reached = {k: v for k, v in new.items() if v["mean_seconds_to_target"] is not None}
    if not reached:
        return {"best": None, "note": f"no new method run with {MIN_SEEDS} seeds at one lr reached MeZO-SGD's target"}
    # a tie on the clock (a wsd run branched from its constant run reaches the target on the same steps): the
    # method that ends higher
    best = min(reached, key=lambda k: (reached[k]["n_reached"] < reached[k]["n_runs"],
                                       reached[k]["mean_seconds_to_target"], -reached[k]["mean_final_acc"]))
    b = methods[best]
    ratio = (mezo["mean_seconds_to_target"] / b["mean_seconds_to_target"]
             if mezo["mean_seconds_to_target"] and b["mean_seconds_to_target"] else None)
    out = {"best": best, "speedup_vs_mezo": ratio, "speedup_bar": SPEEDUP_BAR,
           "speedup_met": ratio is not None and ratio >= SPEEDUP_BAR and b["n_reached"] == b["n_runs"],
           "acc_in_mezo_budget_delta": (b["mean_acc_in_mezo_budget"] - mezo["mean_acc_in_mezo_budget"]
                                        if b["mean_acc_in_mezo_budget"] is not None else None)}
    # runs that stopped before MeZO's wall-clock give their last accuracy: the bar is then not shown either way
    out["acc_covers_mezo_budget"] = b["covers_mezo_budget"]
    out["acc_met"] = (out["acc_in_mezo_budget_delta"] is not None and out["acc_in_mezo_budget_delta"] >= ACC_BAR
                      and b["covers_mezo_budget"])
    if task == "tweets":
        out["gain_over_zero_shot"] = b["mean_gain_over_zero_shot"]
        out["gain_met"] = b["mean_gain_over_zero_shot"] >= GAIN_BAR
    return out


def run_curves(runs: list[dict], disk: dict) -> dict[str, list[list[tuple[int, float, float]]]]:
    """Per method: each seed's (step, seconds on the disk clock, test accuracy) curve. Seeds are drawn one by
    one, not averaged: runs stopped by a deadline end at different steps."""
    out: dict[str, list] = defaultdict(list)
    for r in runs:
        sps, _ = _seconds_per_step(r, disk)
        out[_key(r)].append([(p["step"], p["step"] * sps, p["test_acc"]) for p in r["curve"]])
    return dict(out)


def plot(summary: dict, curves: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(curves)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, (xi, xlabel) in enumerate(((0, "steps"), (1, "seconds (every layer on disk)"))):
            ax = axes[row][col]
            for color, (name, seeds) in enumerate(sorted(curves[task].items())):
                for i, pts in enumerate(seeds):
                    ax.plot([p[xi] for p in pts], [p[2] for p in pts], marker=".", color=f"C{color}", alpha=0.8,
                            label=name if i == 0 else None)
            ax.axhline(summary[task]["target_acc"], color="grey", ls="--", lw=1, label="target (MeZO-SGD final)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (one line per seed)")
            ax.set_title(task)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def annotate(paths: str, summary: dict, disk: dict) -> int:
    """Write each task's target and each accuracy record's steps and disk seconds to it into ``paths``
    (comma-separated records files, rewritten in place); returns how many records it annotated."""
    n = 0
    for path in paths.split(","):
        with open(path) as f:
            lines = f.readlines()
        out = []
        for line in lines:
            rec = json.loads(line) if line.strip() else None
            if rec is not None and rec.get("kind", "accuracy") == "accuracy" and rec["task"] in summary:
                target = summary[rec["task"]]["target_acc"]
                sps, clock = _seconds_per_step(rec, disk)
                steps, seconds = _to_target(rec, target, sps)
                rec |= {"target_acc": target, "steps_to_target": steps, "seconds_to_target": seconds,
                        "seconds_to_target_clock": f"{clock}: steps x {sps:.4f} s"}
                line = json.dumps(rec) + "\n"
                n += 1
            out.append(line)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(out)
        os.replace(tmp, path)
    return n


def main(argv: list[str] | None = None) -> int:
    cfg = parse_overrides(DEFAULTS, argv)
    runs, disk = load(cfg["records"], cfg["clock"])
    by_task = defaultdict(list)
    for r in runs:
        by_task[r["task"]].append(r)
    targets = {k: float(v) for k, _, v in (p.partition("=") for p in cfg["targets"].split(",") if p)}
    summary = {t: summarize_task(rs, disk, mezo_lr=cfg["mezo_lr"], target=targets.get(t),
                                 mezo_method=cfg["mezo_method"])
               for t, rs in sorted(by_task.items())}
    per_step = {f"{e} q={q}": s for (e, q), s in sorted(disk.items())}
    summary_out = {"clock": cfg["clock"], "disk_seconds_per_step": per_step, "tasks": summary}
    text = json.dumps(summary_out, indent=1)
    if cfg["summary"]:
        with open(cfg["summary"], "w") as f:
            f.write(text + "\n")
    for task, s in summary.items():
        print(f"{task}: target {s['target_acc']:.4f} ({s['mezo_method']}); bars {json.dumps(s['bars'])}")
        for name, m in s["methods"].items():
            print(f"  {name:<28} final {m['mean_final_acc']:.4f}  reached {m['n_reached']}/{m['n_runs']}  "
                  f"steps {m['mean_steps_to_target']}  s {m['mean_seconds_to_target']}  "
                  f"in MeZO's budget {m['mean_acc_in_mezo_budget']}")
    if cfg["png"]:
        plot(summary, {t: run_curves(rs, disk) for t, rs in by_task.items()}, cfg["png"])
    if cfg["annotate"]:
        print(f"annotated {annotate(cfg['records'], summary, disk)} records with their task's target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
