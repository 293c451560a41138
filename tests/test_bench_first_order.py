"""tools/bench_first_order.py on the CPU with a tiny model: its zero-shot point is the zeroth-order bench's
(the same splits, prompt and scoring through transformers instead of the engine), for a Hugging Face folder
and for a store it exports first; and the curve and record are the ones docs/estimators.md reads."""

from __future__ import annotations

import json
import os
import sys

from tiny_task import save_tiny_model, tiny_rows, write_csv

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import bench_first_order as fo
import bench_time_to_accuracy as zo


def _tiny_task(tmp_path) -> str:
    model = save_tiny_model(str(tmp_path / "model"))
    for split, n, seed in (("train", 32, 0), ("dev", 16, 1), ("test", 16, 2)):
        write_csv(str(tmp_path / "data" / f"{split}.csv"), tiny_rows(n, seed))
    return model


def test_first_order_starts_where_the_zeroth_order_bench_does_and_records_its_curve(tmp_path):
    import zo2tier

    model = _tiny_task(tmp_path)
    zo2tier.convert(model, tmp_path / "store", progress=False)
    common = [f"--data={tmp_path / 'data'}", "--batch_size=4", "--max_length=16", f"--work={tmp_path / 'work'}"]
    assert zo.main([*common, f"--model={model}", "--steps=1", "--eval_every=1", f"--out={tmp_path / 'zo.jsonl'}"]) == 0
    (ref,) = [json.loads(x) for x in (tmp_path / "zo.jsonl").read_text().splitlines()]
    for name, path in (("hf", model), ("store", tmp_path / "store")):
        out = tmp_path / f"fo-{name}.jsonl"
        assert fo.main([*common, f"--model={path}", "--steps=6", "--eval_every=3", "--lr=1e-2", f"--out={out}"]) == 0
        (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
        assert rec["kind"] == "first_order" and rec["steps"] == 6 and rec["seconds"] > 0
        assert [p["step"] for p in rec["curve"]] == [0, 3, 6]
        assert (rec["curve"][0]["dev_acc"], rec["zero_shot_acc"]) == (ref["curve"][0]["dev_acc"], ref["zero_shot_acc"])
        assert rec["max_test_acc"] == max(p["test_acc"] for p in rec["curve"])
        assert rec["test_at_best_dev"] in [p["test_acc"] for p in rec["curve"]]
    assert os.path.isfile(tmp_path / "work" / "hf-store" / "config.json")  # the store went through export once
