"""tools/bench_finetune_defaults.py on the CPU: one real ``zo2tier finetune`` run of a tiny model, and its record."""

from __future__ import annotations

import json
import os
import sys

from tiny_task import save_tiny_model, tiny_rows, write_csv

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import bench_finetune_defaults as bench


def test_one_cli_run_becomes_one_record_of_the_settings_it_ran_with(tmp_path):
    model = save_tiny_model(str(tmp_path / "model"))
    data = tmp_path / "data"
    for split, n, seed in (("train", 32, 0), ("dev", 8, 1), ("test", 8, 2)):
        write_csv(str(data / f"{split}.csv"), tiny_rows(n, seed))
    (data / "task.json").write_text(json.dumps({"task": "tiny", "template": "{text} It was",
                                                "label_words": "positive=great,negative=terrible"}))
    out = tmp_path / "records.jsonl"
    assert bench.main([f"--data={data}", f"--model={model}", "--eval_every=1", f"--work={tmp_path / 'work'}",
                       "--flags=--estimator fzoo --steps 2 --batch-size 4 --device cpu", f"--out={out}"]) == 0
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    # FZOO's own defaults filled in by the CLI, not MeZO's
    assert rec["settings"] == {"estimator": "fzoo", "n_perturbations": 8, "lr": 3e-4, "eps": 1e-3, "seed": 0,
                               "steps": 2, "batch_size": 4, "objective": "lm"}
    assert rec["task"] == "tiny" and rec["card"] == "cpu"
    assert rec["command"].startswith("zo2tier finetune --model ") and "--estimator fzoo" in rec["command"]
    tests = [(c["step"], c["n"]) for c in rec["curve"] if c["split"] == "test"]
    assert tests == [(0, 8), (1, 8), (2, 8)]
    assert rec["zero_shot_acc"] == rec["curve"][0]["acc"]
    assert rec["ends_below_zero_shot"] == (rec["final_acc"] < rec["zero_shot_acc"])
