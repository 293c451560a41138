"""Issue 8, item 5: bad budgets and arguments get a ValueError naming the value and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import BIG, CFG
from tiny_models import tiny_batch, tiny_model

import zo2tier
from zo2tier.budget import TierBudget, parse_size
from zo2tier.train import data


@pytest.mark.parametrize(("budget", "match"), [
    ({"device": "-1GiB"}, r"device budget '-1GiB' is negative; use a size >= 0"),
    ({"device": -5}, r"device budget -5 is negative"),
    ({"device": "lots"}, r"device budget 'lots' is not a size; write a number and a unit"),
    ({"device": "8 GiBs"}, r"unknown unit 'GiBs'; use one of"),
    ({"device": "9" * 40 + "TiB"}, r"larger than 8 EiB; check the number and the unit"),
    ({"device": 1.5}, r"device budget 1.5 is not a size; use bytes \(int\)"),
    ({"host": "1GiB"}, r"budget has no 'device' entry"),
    ({"device": "1GiB", "gpu": "1GiB"}, r"unknown budget key\(s\) \['gpu'\]; use only device, host, disk"),
    ("device=1GiB,host", r"budget entry 'host' has no '='; write it as device=8GiB"),
    ("device=1GiB,device=2GiB", r"budget names 'device' twice"),
])
def test_bad_budget(budget, match):
    with pytest.raises(ValueError, match=match):
        TierBudget.parse(budget)


def test_budget_too_small_names_tier_and_fix():
    model = tiny_model("llama")
    on_disk = {name: "disk" for name in zo2tier.ZOEngine.block_names(model)}
    with pytest.raises(ValueError, match=r"the disk tier needs .* but its budget is 0 B: .* short; raise the disk budget"):
        zo2tier.ZOEngine(model, budget={"device": "1GiB"}, config=CFG, placement=on_disk)
    with pytest.raises(ValueError, match=r"the device tier needs .* but its budget is 1.00 KiB.*raise the device budget"):
        zo2tier.ZOEngine(model, budget={"device": "1KiB", "host": "1GiB"}, config=CFG)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eps": 0.0}, r"eps=0.0 must be > 0; the default 1e-3"),
    ({"eps": -1e-3}, r"eps=-0.001 must be > 0"),
    ({"lr": -1e-6}, r"lr=-1e-06 is negative; use lr >= 0"),
    ({"lr": float("nan")}, r"lr=nan must be a finite number"),
    ({"weight_decay": -0.1}, r"weight_decay=-0.1 is negative"),
    ({"seed": -1}, r"seed=-1 must be an int in \[0, 2\*\*32\)"),
    ({"perturbation": "uniform"}, r"perturbation='uniform' is unknown; use one of gaussian, rademacher"),
])
def test_bad_mezo_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zo2tier.MeZOConfig(**kwargs)


def test_bad_parse_size_values():
    for bad in (True, None, [], "1e3GiB", "", "GiB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


@pytest.fixture(scope="module")
def engine():
    with zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, config=CFG) as engine:
        yield engine


def _bad_batches():
    good = tiny_batch()
    yield {"input_ids": good["input_ids"], "attention_mask": good["attention_mask"][:, :5]}, \
        r"attention_mask has shape \(2, 5\) but input_ids has \(2, 12\); they must match"
    yield {"input_ids": good["input_ids"], "labels": good["labels"][:1]}, \
        r"labels has shape \(1, 12\) but input_ids has \(2, 12\)"
    yield {"input_ids": good["input_ids"][0]}, r"input_ids must be a non-empty \(batch, seq\) tensor"
    yield {"input_ids": torch.zeros(0, 4, dtype=torch.long)}, r"input_ids must be a non-empty"
    yield {"input_ids": good["input_ids"].float()}, r"input_ids has dtype torch.float32; pass token ids as an integer"
    yield {"attention_mask": good["attention_mask"]}, r"batch must be a dict with 'input_ids'"


@pytest.mark.parametrize("case", range(6))
def test_bad_batch(engine, case):
    batch, match = list(_bad_batches())[case]
    with pytest.raises(ValueError, match=match):
        engine.step(batch)


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf"), "1e-3"])
def test_bad_step_lr(engine, lr):
    with pytest.raises(ValueError, match=r"lr=.* must be a finite number >= 0"):
        engine.step(tiny_batch(), lr=lr)


@pytest.mark.parametrize("content", ["text,label\n", "", "text,label\n   ,pos\n"])
def test_empty_dataset(tmp_path, content):
    """An empty data file (issue 6's loader) ends in a ValueError, at the latest when batches are drawn."""
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"train.csv|0 training examples"):
        examples = data.load_examples(path)
        data.batch_indices(len(examples), 4, 0, seed=0)


def test_bad_engine_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"write_back_every=0.* must be an int >= 1"):
        zo2tier.ZOEngine(model, budget=BIG, write_back_every=0)
    with pytest.raises(ValueError, match=r"some blocks are placed on disk but disk_dir is None; pass disk_dir="):
        zo2tier.ZOEngine(model, budget=BIG, placement={n: "disk" for n in zo2tier.ZOEngine.block_names(model)})
    with pytest.raises(ValueError, match=r"storage dtype 'fp8' is unknown"):
        zo2tier.ZOEngine(model, budget=BIG, storage={"host": "fp8"})


def test_a_convert_that_never_finished_is_named_as_such(tmp_path):
    """A convert stopped before its manifest leaves only zo2tier's marker: opening the folder says so."""
    from zo2tier.model_ref import model_ref
    from zo2tier.store.lock import MARKER

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / MARKER).write_text("{}")
    with pytest.raises(ValueError, match="holds zo2tier files but no manifest.json: a convert into it did not finish"):
        model_ref(tmp_path / "s")
