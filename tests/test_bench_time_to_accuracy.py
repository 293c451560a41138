"""tools/bench_time_to_accuracy.py on the CPU with a tiny model (a sweep of two runs, the disk timing), and
tools/summarize_time_to_accuracy.py on records whose targets and ratios are checked by hand."""

from __future__ import annotations

import json
import os
import sys

import pytest
from tiny_task import save_tiny_model, tiny_rows, write_csv

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import bench_time_to_accuracy as bench
import summarize_time_to_accuracy as summ

KEYS = {"card", "model", "task", "method", "estimator", "q", "placement", "storage", "seed", "lr", "steps",
        "seconds", "zero_shot_acc", "final_acc", "target_acc", "steps_to_target", "seconds_to_target", "git_rev",
        "command", "curve"}


def _tiny_task(tmp_path) -> str:
    """A tiny model at tmp_path/model (its path returned) and its train/dev/test splits in tmp_path/data."""
    model = save_tiny_model(str(tmp_path / "model"))
    for split, n, seed in (("train", 32, 0), ("dev", 8, 1), ("test", 8, 2)):
        write_csv(str(tmp_path / "data" / f"{split}.csv"), tiny_rows(n, seed))
    return model


def test_sweep_and_disk_timing_write_records(tmp_path):
    model = _tiny_task(tmp_path)
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text('{"estimator": "mezo", "q": "1"}\n{"estimator": "fzoo", "q": "2", "lr": 1e-3, "seed": 1}\n')
    out = tmp_path / "records.jsonl"
    common = [f"--model={model}", f"--data={tmp_path / 'data'}", "--batch_size=4", "--max_length=16",
              f"--out={out}", f"--work={tmp_path / 'work'}"]
    assert bench.main([*common, "--steps=3", "--eval_every=2", f"--sweep={sweep}", "--workers=2",
                       "--target_acc=0.0", f"--progress_dir={tmp_path / 'progress'}"]) == 0
    assert bench.main([*common, "--time_disk=1", "--time_steps=1", "--methods=mezo:1,fzoo:auto"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    runs = sorted((r for r in records if r["kind"] == "accuracy"), key=lambda r: r["estimator"])
    assert [(r["estimator"], r["q"], r["seed"]) for r in runs] == [("fzoo", 2, 1), ("mezo", 1, 0)]
    for r in runs:
        assert KEYS <= set(r)
        assert [p["step"] for p in r["curve"]] == [0, 2, 3]  # zero-shot, every 2 steps, the last step
        assert r["steps_to_target"] == 0 and r["seconds_to_target"] == 0.0  # target 0: reached at once
        assert r["final_acc"] == r["curve"][-1]["test_acc"] and r["zero_shot_acc"] == r["curve"][0]["test_acc"]
    # each run's snapshot, rewritten at every evaluation, ends as its record
    snapshots = [json.loads((tmp_path / "progress" / f).read_text()) for f in os.listdir(tmp_path / "progress")]
    assert all(len(s.pop("log")) == 3 * s["q"] for s in snapshots)  # the update log rides along
    assert sorted(json.dumps(s, sort_keys=True) for s in snapshots) == sorted(
        json.dumps(r, sort_keys=True) for r in runs)
    timed = [r for r in records if r["kind"] == "time_disk"]
    assert [(r["estimator"], r["q_requested"]) for r in timed] == [("mezo", "1"), ("fzoo", "auto")]
    assert timed[1]["q"] >= 2 and timed[1]["q_auto"]["limit"] in ("transfer", "memory", "max", "compute")
    assert all(r["placement"] == "disk" and r["seconds_per_step"] > 0 for r in timed)


def _rec(task, estimator, q, lr, seed, curve, zero=0.7, steps=None):
    pts = [{"step": s, "seconds": s * 0.1, "dev_acc": a, "test_acc": a} for s, a in curve]
    return {"kind": "accuracy", "task": task, "method": f"{estimator} q={q}", "estimator": estimator, "q": q,
            "lr": lr, "seed": seed, "steps": steps or curve[-1][0], "seconds": 0.1 * curve[-1][0],
            "zero_shot_acc": zero, "final_acc": curve[-1][1], "final_dev_acc": curve[-1][1], "curve": pts}


def test_summary_targets_and_bars_by_hand(tmp_path):
    path = tmp_path / "r.jsonl"
    recs = [
        _rec("tweets", "mezo", 1, 1e-5, 0, [(0, 0.70), (500, 0.74), (1000, 0.78)]),
        _rec("tweets", "mezo", 1, 1e-5, 1, [(0, 0.70), (500, 0.76), (1000, 0.80)]),  # target: mean 0.79
        _rec("tweets", "mezo", 1, 1e-4, 0, [(0, 0.70), (500, 0.60), (1000, 0.50)]),  # a worse lr, not chosen
        _rec("tweets", "fzoo", 8, 3e-5, 0, [(0, 0.70), (100, 0.80), (1000, 0.85)]),
        _rec("tweets", "fzoo", 8, 3e-5, 1, [(0, 0.70), (200, 0.79), (1000, 0.83)]),
        _rec("tweets", "fzoo", 8, 3e-5, 2, [(0, 0.70), (150, 0.79), (1000, 0.84)]),
        {"kind": "time_disk", "estimator": "mezo", "q": 1, "seconds_per_step": 1.5, "median_seconds_per_step": 1.0},
        {"kind": "time_disk", "estimator": "fzoo", "q": 8, "seconds_per_step": 2.0, "median_seconds_per_step": 2.0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    runs, disk = summ.load(str(path))
    s = summ.summarize_task(runs, disk)
    assert s["target_acc"] == pytest.approx(0.79) and s["mezo_method"] == "mezo q=1 lr=1e-05"
    assert s["mezo_budget_s"] == 1000.0  # 1000 steps x 1.0 s (the median step; the mean clock gives 1.5 s)
    assert summ.summarize_task(*summ.load(str(path), "mean"))["mezo_budget_s"] == 1500.0
    mezo, fzoo = s["methods"]["mezo q=1 lr=1e-05"], s["methods"]["fzoo q=8 lr=3e-05"]
    assert (mezo["n_reached"], mezo["mean_steps_to_target"]) == (1, 1000)  # seed 0 never reaches 0.79
    assert fzoo["mean_steps_to_target"] == 150 and fzoo["mean_seconds_to_target"] == 300.0  # 2 s per step
    # within MeZO's 1000 s fzoo runs 500 steps: its last eval points there are steps 100, 200, 150
    assert fzoo["mean_acc_in_mezo_budget"] == pytest.approx((0.80 + 0.79 + 0.79) / 3) and fzoo["covers_mezo_budget"]
    bars = s["bars"]
    assert bars["best"] == "fzoo q=8 lr=3e-05" and bars["speedup_vs_mezo"] == pytest.approx(1000 / 300)
    assert bars["speedup_met"] and bars["acc_in_mezo_budget_delta"] == pytest.approx((0.80 + 0.79 + 0.79) / 3 - 0.79)
    assert "equal_clock" not in bars  # the runs cover MeZO's budget: the bar itself is shown
    assert not bars["acc_met"] and bars["gain_over_zero_shot"] == pytest.approx(0.14) and bars["gain_met"]
    assert summ.main([f"--records={path}", f"--png={tmp_path / 'c.png'}", f"--summary={tmp_path / 's.json'}"]) == 0
    assert os.path.getsize(tmp_path / "c.png") > 0
    assert json.loads((tmp_path / "s.json").read_text())["tasks"]["tweets"]["target_acc"] == pytest.approx(0.79)


def test_summary_takes_mezo_from_named_longer_runs_in_another_file(tmp_path):
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    short.write_text("\n".join(json.dumps(r) for r in (
        _rec("tweets", "mezo", 1, 1e-5, 0, [(0, 0.70), (100, 0.72)]),
        *(_rec("tweets", "fzoo", 8, 3e-4, seed, [(0, 0.70), (100, 0.80)]) for seed in range(3)),
        {"kind": "time_disk", "estimator": "mezo", "q": 1, "seconds_per_step": 1.0, "median_seconds_per_step": 1.0},
        {"kind": "time_disk", "estimator": "fzoo", "q": 8, "seconds_per_step": 2.0, "median_seconds_per_step": 2.0},
    )) + "\n")
    longer = _rec("tweets", "mezo", 1, 1e-5, 0, [(0, 0.70), (500, 0.76), (1000, 0.78)])
    long.write_text(json.dumps(longer | {"method": "mezo q=1 (1000 steps)"}) + "\n")
    runs, disk = summ.load(f"{short},{long}")
    s = summ.summarize_task(runs, disk, mezo_method="mezo q=1 (1000 steps)")
    assert s["target_acc"] == pytest.approx(0.78) and s["mezo_budget_s"] == 1000.0
    assert s["bars"]["best"] == "fzoo q=8 lr=0.0003" and s["bars"]["speedup_vs_mezo"] == pytest.approx(1000 / 200)
    assert not s["bars"]["acc_covers_mezo_budget"]  # fzoo ran 100 steps x 2 s, not MeZO's 1000 s
    assert summ.summarize_task(runs, disk)["target_acc"] == pytest.approx(0.75)  # default: every MeZO run


def test_summary_breaks_a_tie_to_target_by_the_higher_final_accuracy(tmp_path):
    """A wsd run branched from its constant run reaches the target on the same steps: the best is the one
    that ends higher, whichever comes first."""
    path = tmp_path / "r.jsonl"
    recs = [_rec("tweets", "mezo", 1, 1e-5, 0, [(0, 0.70), (1000, 0.78)])]
    for label, end in (("fzoo q=8", 0.80), ("fzoo q=8 wsd", 0.82), ("fzoo q=8 zz", 0.79)):
        recs += [_rec("tweets", "fzoo", 8, 3e-4, seed, [(0, 0.70), (100, 0.79), (200, end)]) | {"method": label}
                 for seed in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    bars = summ.summarize_task(*summ.load(str(path)))["bars"]
    assert bars["best"] == "fzoo q=8 wsd lr=0.0003" and bars["gain_over_zero_shot"] == pytest.approx(0.12)


def test_summary_counts_a_continued_run_once_and_takes_each_lr_by_dev(tmp_path):
    """A seed recorded short and then continued counts once, at its longest; the new method's lr is the one
    with the best mean final dev accuracy among lrs with 3 seeds (not the best test accuracy, not a 2-seed
    lr); a disk run is a method of its own; runs ending before MeZO's budget are compared at equal clock."""
    def dev(rec, acc):
        return rec | {"final_dev_acc": acc}

    recs = [_rec("tweets", "mezo", 1, 1e-5, s, [(0, 0.70), (500, 0.74), (1000, 0.78)]) for s in range(3)]
    recs += [_rec("tweets", "fzoo", 8, 3e-4, s, [(0, 0.70), (100, 0.75)]) for s in range(3)]  # short, then longer
    recs += [dev(_rec("tweets", "fzoo", 8, 3e-4, s, [(0, 0.70), (100, 0.75), (300, 0.79)]), 0.77) for s in range(3)]
    recs += [dev(_rec("tweets", "fzoo", 8, 1e-3, s, [(0, 0.70), (100, 0.80)]), 0.76) for s in range(3)]
    recs += [dev(_rec("tweets", "fzoo", 8, 3e-3, s, [(0, 0.70), (100, 0.81)]), 0.79) for s in range(2)]
    recs += [_rec("tweets", "fzoo", 8, 3e-4, 0, [(0, 0.70), (50, 0.71)]) | {"placement": "disk"}]
    # "q=auto" resolved to different q in different versions: two methods, never one run continued
    recs += [_rec("tweets", "fzoo", q, 3e-4, 0, [(0, 0.70), (50, 0.70 + q / 100)]) | {"method": "fzoo q=auto"}
             for q in (3, 8)]
    recs += [{"kind": "time_disk", "estimator": "mezo", "q": 1, "seconds_per_step": 1.0, "median_seconds_per_step": 1.0},
             {"kind": "time_disk", "estimator": "fzoo", "q": 8, "seconds_per_step": 2.0, "median_seconds_per_step": 2.0}]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    runs, disk = summ.load(str(path))
    assert len(runs) == 3 + 3 + 3 + 2 + 1 + 2
    s = summ.summarize_task(runs, disk)
    chosen = s["methods"]["fzoo q=8 lr=0.0003"]
    assert chosen["n_runs"] == 3 and chosen["mean_steps_to_target"] == 300 and chosen["mean_final_dev_acc"] == 0.77
    assert s["lr_by_dev"] == {"fzoo q=8": "fzoo q=8 lr=0.0003"}
    assert s["methods"]["fzoo q=8 lr=0.0003 on disk"]["n_runs"] == 1
    assert [s["methods"][f"fzoo q=auto:{q} lr=0.0003"]["mean_final_acc"] for q in (3, 8)] == pytest.approx([0.73, 0.78])
    bars = s["bars"]
    assert bars["best"] == "fzoo q=8 lr=0.0003" and bars["speedup_vs_mezo"] == pytest.approx(1000 / 600)
    assert not bars["acc_covers_mezo_budget"] and not bars["acc_met"]  # 300 steps x 2 s < MeZO's 1000 s
    # at 600 s, the clock fzoo's runs cover: fzoo 0.79 (step 300), MeZO 0.74 (its step 500)
    assert bars["equal_clock"] == pytest.approx({"seconds": 600.0, "new_acc": 0.79, "mezo_acc": 0.74,
                                                 "delta": 0.05, "met": True})
    # --annotate=1: every accuracy record carries its task's target and its steps / disk seconds to it
    assert summ.main([f"--records={path}", "--annotate=1"]) == 0
    after = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r for r in after if r["kind"] == "time_disk"] == recs[-2:]
    runs_after = [r for r in after if r["kind"] == "accuracy"]
    assert len(runs_after) == len(recs) - 2 and all(r["target_acc"] == pytest.approx(0.78) for r in runs_after)
    long_fzoo = [r for r in runs_after if r["lr"] == 3e-4 and r["steps"] == 300]
    assert [(r["steps_to_target"], r["seconds_to_target"]) for r in long_fzoo] == [(300, 600.0)] * 3
    short = [r for r in runs_after if r["method"] == "fzoo q=8" and r["lr"] == 3e-4 and r["steps"] < 300]
    assert len(short) == 4 and all(r["steps_to_target"] is None for r in short)
    assert summ.summarize_task(*summ.load(str(path))) == s  # the annotation changes no summary


def test_a_run_cut_by_its_call_goes_on_from_its_snapshot(tmp_path):
    """Two calls of 2 + 2 steps (the second with --resume_dir) give the curve of one call of 4 steps."""
    model = _tiny_task(tmp_path)
    common = [f"--model={model}", f"--data={tmp_path / 'data'}", "--batch_size=4", "--max_length=16",
              f"--work={tmp_path / 'work'}", "--estimator=fzoo", "--q=2", "--lr=1e-2", "--steps=4",
              "--eval_every=2", "--lr_schedule=linear"]
    assert bench.main([*common, f"--out={tmp_path / 'one.jsonl'}"]) == 0
    # the first call stops after step 2 (its snapshot is what a cut call leaves); the second goes on
    assert bench.main([*common, f"--out={tmp_path / 'cut.jsonl'}", f"--progress_dir={tmp_path / 'p1'}",
                       "--stop_after=2"]) == 0
    assert bench.main([*common, f"--out={tmp_path / 'two.jsonl'}", f"--resume_dir={tmp_path / 'p1'}"]) == 0
    (one,) = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    (two,) = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [(p["step"], p["dev_acc"], p["test_acc"]) for p in one["curve"]] == \
        [(p["step"], p["dev_acc"], p["test_acc"]) for p in two["curve"]]
    assert (two["steps"], two["segments"], one["segments"]) == (4, 2, 1)
    with pytest.raises(ValueError, match="same settings"):
        bench.main([*common, "--max_length=12", f"--out={tmp_path / 'bad.jsonl'}", f"--resume_dir={tmp_path / 'p1'}"])


def test_a_store_gives_the_run_of_its_source(tmp_path):
    """--model may be a zo2tier store (opened in seconds where a GGUF takes ~30 s): the same curve as the
    Hugging Face folder it was converted from."""
    import zo2tier

    model = _tiny_task(tmp_path)
    zo2tier.convert(model, tmp_path / "store", progress=False)
    common = [f"--data={tmp_path / 'data'}", "--batch_size=4", "--max_length=16", f"--work={tmp_path / 'work'}",
              "--estimator=fzoo", "--q=2", "--lr=1e-2", "--steps=2", "--eval_every=1"]
    curves = []
    for name, path in (("hf", model), ("store", tmp_path / "store")):
        out = tmp_path / f"{name}.jsonl"
        assert bench.main([*common, f"--model={path}", f"--out={out}"]) == 0
        (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
        curves.append([(p["step"], p["dev_acc"], p["test_acc"]) for p in rec["curve"]])
    assert curves[0] == curves[1] and len(curves[0]) == 3


def test_a_wsd_run_goes_on_from_the_constant_run_before_its_decay(tmp_path):
    """wsd over 10 steps has lr at steps 0-8 and lr/2 at step 9: a constant run's snapshot at step 4 goes on as
    that wsd run and gives the curve of the wsd run from scratch; a snapshot of 10 steps is not taken."""
    model = _tiny_task(tmp_path)
    common = [f"--model={model}", f"--data={tmp_path / 'data'}", "--batch_size=4", "--max_length=16",
              f"--work={tmp_path / 'work'}", "--estimator=fzoo", "--q=2", "--lr=1e-2", "--eval_every=2"]
    wsd = [*common, "--steps=10", "--lr_schedule=wsd"]
    assert bench.main([*wsd, f"--out={tmp_path / 'one.jsonl'}"]) == 0
    assert bench.main([*common, "--steps=100", f"--out={tmp_path / 'c.jsonl'}", f"--progress_dir={tmp_path / 'p'}",
                       "--stop_after=4"]) == 0
    assert bench.main([*wsd, f"--out={tmp_path / 'two.jsonl'}", f"--resume_dir={tmp_path / 'p'}"]) == 0
    (one,) = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    (two,) = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [(p["step"], p["dev_acc"], p["test_acc"]) for p in one["curve"]] == \
        [(p["step"], p["dev_acc"], p["test_acc"]) for p in two["curve"]]
    assert one["branched_from"] is None and two["branched_from"]["steps"] == 4 and two["segments"] == 2
    assert bench.main([*common, "--steps=100", f"--out={tmp_path / 'c9.jsonl'}", f"--progress_dir={tmp_path / 'p9'}",
                       "--stop_after=10"]) == 0
    assert bench.main([*wsd, f"--out={tmp_path / 'three.jsonl'}", f"--resume_dir={tmp_path / 'p9'}"]) == 0
    (three,) = [json.loads(x) for x in (tmp_path / "three.jsonl").read_text().splitlines()]
    assert three["branched_from"] is None and three["curve"] == [dict(p, seconds=q["seconds"]) for p, q in
                                                                   zip(one["curve"], three["curve"])]


def test_the_disk_clock_is_the_last_stacked_timing_of_a_q_asked_for_by_name(tmp_path):
    """A q asked for by name wins over auto's same q, and the A/B's control (copies one at a time) never counts."""
    path = tmp_path / "r.jsonl"
    recs = [{"kind": "time_disk", "estimator": "fzoo", "q": 8, "q_requested": "8", "median_seconds_per_step": 0.5},
            {"kind": "time_disk", "estimator": "fzoo", "q": 8, "q_requested": "8", "stack_bytes": 1 << 30,
             "median_seconds_per_step": 0.39},
            {"kind": "time_disk", "estimator": "fzoo", "q": 8, "q_requested": "auto", "stack_bytes": 1 << 30,
             "median_seconds_per_step": 0.36},
            {"kind": "time_disk", "estimator": "fzoo", "q": 8, "q_requested": "8", "stack_bytes": 0,
             "stack_control": True, "median_seconds_per_step": 0.52},
            {"kind": "time_disk", "estimator": "mezo", "q": 1, "q_requested": "1", "stack_bytes": 0,
             "stack_control": False, "median_seconds_per_step": 3.0},  # a CPU run: no stacking there, no control
            {"kind": "time_disk", "estimator": "fzoo", "q": 16, "q_requested": "auto", "median_seconds_per_step": 0.4}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    _, disk = summ.load(str(path))
    assert disk == {("fzoo", 8): 0.39, ("fzoo", 16): 0.4, ("mezo", 1): 3.0}
