"""zo2tier.train.job at its edges: what --overwrite keeps when an input is bad, what a resume may change, a
moved run, rows without a label word, a --max-length past the model, and the disk tier as a usable store."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_task import save_tiny_model, tiny_rows, write_csv

from zo2tier import cli
from zo2tier.train.job import finetune

PLACES = {f"model.layers.{i}": t for i, t in enumerate(["device", "host", "disk", "disk"])}


@pytest.fixture
def task(tmp_path):
    return {"model": save_tiny_model(str(tmp_path / "model")),
            "train": write_csv(str(tmp_path / "train.csv"), tiny_rows(32, seed=0)),
            "test": write_csv(str(tmp_path / "test.csv"), tiny_rows(8, seed=1)),
            "batch_size": 8, "lr": 1e-3, "objective": "classification", "progress": False}


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "model", "model.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_with_a_bad_input_keeps_the_earlier_run(task, tmp_path):
    out = tmp_path / "out"
    finetune(out=str(out), steps=2, budget="device=1GiB", **task)
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match="none labelled"):
        finetune(out=str(out), steps=2, overwrite=True, budget="device=1GiB", **(task | {"label_words": "a=great,b=bad"}))
    with pytest.raises(FileNotFoundError):
        finetune(out=str(out), steps=2, overwrite=True, budget="device=1GiB", **(task | {"test": "missing.csv"}))
    assert sorted(os.listdir(out)) == before and (out / "checkpoint").is_dir()


def test_a_run_that_fails_to_start_leaves_no_out(task, tmp_path):
    with pytest.raises(ValueError):
        finetune(out=str(tmp_path / "new"), steps=2, budget="device=1KiB,host=1KiB", **task)  # fits nowhere
    assert not (tmp_path / "new").exists()


def test_rows_whose_label_has_no_word_are_said_to_be_left_out(task, tmp_path, capsys):
    rows = tiny_rows(8, seed=1) + [{"text": "so so film", "label": "neutral"}] * 3
    test = write_csv(str(tmp_path / "test3.csv"), rows)
    r = finetune(out=str(tmp_path / "o"), steps=1, budget="device=1GiB", export="none", **(task | {"test": test}))
    assert r.n_test == 8
    assert f"{test}: 3 of 11 rows are left out: their labels ['neutral'] have no label word" in capsys.readouterr().out


def test_eval_test_that_adds_nothing_is_said(task, tmp_path, capsys):
    finetune(out=str(tmp_path / "a"), steps=1, budget="device=1GiB", export="none", eval_test=True, **task)
    assert "--eval-test adds nothing: without --dev" in capsys.readouterr().out
    finetune(out=str(tmp_path / "b"), steps=1, budget="device=1GiB", export="none", eval_test=True,
             **(task | {"dev": task["test"]}))
    assert "--eval-test adds nothing: --eval-every 0 makes no eval points" in capsys.readouterr().out
    finetune(out=str(tmp_path / "c"), steps=1, budget="device=1GiB", export="none", eval_test=True, eval_every=1,
             **(task | {"dev": task["test"]}))
    assert "--eval-test" not in capsys.readouterr().out


def test_max_length_past_the_model_is_refused_up_front(task, tmp_path):
    with pytest.raises(ValueError, match="--max-length 65 exceeds the model's 64 positions"):
        finetune(out=str(tmp_path / "o"), steps=1, max_length=65, **task)
    assert not (tmp_path / "o").exists()


def test_resume_refuses_another_test_split_and_takes_the_same_file_by_another_path(task, tmp_path, monkeypatch):
    out = tmp_path / "o"
    finetune(out=str(out), steps=2, budget="device=1GiB", **task)
    other = write_csv(str(tmp_path / "other.csv"), tiny_rows(8, seed=5))
    with pytest.raises(ValueError, match="was written with test="):
        finetune(out=str(out), steps=3, resume=True, budget="device=1GiB", **(task | {"test": other}))
    monkeypatch.chdir(tmp_path)  # the same files, named relative to the new working directory
    relative = {k: os.path.relpath(task[k]) for k in ("model", "train", "test")}
    assert finetune(out="o", steps=3, resume=True, budget="device=1GiB", **(task | relative)).steps == 3


def test_resume_from_another_directory_with_absolute_paths(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = {k: os.path.relpath(task[k]) for k in ("model", "train", "test")}
    finetune(out="o", steps=2, budget="device=1GiB", **(task | relative))
    monkeypatch.chdir("/")
    assert finetune(out=str(tmp_path / "o"), steps=3, resume=True, budget="device=1GiB", **task).steps == 3


def test_a_disk_dir_holding_a_store_is_refused(task, tmp_path):
    """The model's own store needs --in-place; another store (here a second converted model) --overwrite: a
    fresh run would replace its blocks."""
    from zo2tier.store.convert import convert

    store, other = str(tmp_path / "store"), str(tmp_path / "other")
    convert(task["model"], store, progress=False)
    convert(task["model"], other, progress=False)
    manifest = (tmp_path / "store/manifest.json").read_bytes()
    kw = task | {"model": store, "steps": 1, "budget": "device=1GiB,host=1GiB,disk=1GiB", "placement": PLACES}
    with pytest.raises(ValueError, match="is the model's store.*pass --in-place"):
        finetune(out=str(tmp_path / "a"), disk_dir=store, **kw)
    with pytest.raises(ValueError, match="already holds a zo2tier store.*--overwrite to replace it"):
        finetune(out=str(tmp_path / "b"), disk_dir=other, **kw)
    assert (tmp_path / "store/manifest.json").read_bytes() == manifest and not (tmp_path / "a").exists()
    assert finetune(out=str(tmp_path / "b"), disk_dir=other, overwrite=True, **kw).steps == 1


def test_a_store_converted_narrow_keeps_its_disk_tier(task, tmp_path):
    """A store converted with --disk-dtype int8 --compress zstd is fine-tuned with an int8, zstd disk tier (as
    `zo2tier plan` assumes), unless --storage says otherwise."""
    from zo2tier.store.convert import convert

    store = str(tmp_path / "store")
    convert(task["model"], store, disk_dtype="int8", compress="zstd", progress=False)
    kw = task | {"model": store, "steps": 1, "budget": "device=1GiB,host=1GiB,disk=1GiB", "placement": PLACES,
                 "export": "none"}
    r = finetune(out=str(tmp_path / "a"), **kw)
    assert r.storage["disk"] == "int8"
    blocks = json.loads((tmp_path / "a/disk/manifest.json").read_text())["blocks"]
    assert all(b["dtype"] == "int8" and "zstd" in b for b in blocks[2:4])
    assert finetune(out=str(tmp_path / "b"), storage={"disk": "fp32"}, compress="none", **kw).storage["disk"] == "fp32"


def test_resume_replans_the_tiers_it_is_given_and_ends_as_the_uninterrupted_run(task, tmp_path, capsys):
    """A run cut at step 2 with layers on host and disk, resumed with everything on the device: the tiers follow
    the new budget, the run says so, and the weights equal those of a run never cut (fp32 in every tier)."""
    kw = task | {"budget": "device=1GiB,host=1GiB,disk=1GiB", "eval_every": 2}
    full = finetune(out=str(tmp_path / "full"), steps=4, placement=PLACES, disk_dir=str(tmp_path / "d1"), **kw)
    finetune(out=str(tmp_path / "cut"), steps=2, placement=PLACES, disk_dir=str(tmp_path / "d2"), **kw)
    capsys.readouterr()
    resumed = finetune(out=str(tmp_path / "cut"), steps=4, resume=True, **(kw | {"budget": "device=2GiB"}))
    assert "--resume: the tiers follow this run's --budget" in capsys.readouterr().out
    assert resumed.placement == {"device": 4, "host": 0, "disk": 0} != full.placement
    assert resumed.finetuned_acc == full.finetuned_acc and _same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    finetune(out=str(tmp_path / "cut2"), steps=2, placement=PLACES, **kw)
    bf16 = finetune(out=str(tmp_path / "cut2"), steps=4, resume=True, storage={"host": "bf16", "disk": "bf16"}, **kw)
    assert "the tiers follow this run's --storage" in capsys.readouterr().out
    assert bf16.storage == {"device": "fp32", "host": "bf16", "disk": "bf16"}
    w = _weights(tmp_path / "cut2")
    assert w["model.layers.2.mlp.up_proj.weight"].dtype == torch.float32  # exported in the compute dtype
    assert torch.equal(w["model.layers.2.mlp.up_proj.weight"], w["model.layers.2.mlp.up_proj.weight"].bfloat16().float())
    with pytest.raises(ValueError, match="keeps its disk tier in"):
        finetune(out=str(tmp_path / "cut"), steps=5, resume=True, disk_dir=str(tmp_path / "elsewhere"), **kw)


def test_a_moved_run_resumes(task, tmp_path):
    kw = task | {"budget": "device=1GiB,host=1GiB,disk=1GiB", "placement": PLACES, "eval_every": 2}
    finetune(out=str(tmp_path / "full"), steps=4, **kw)
    finetune(out=str(tmp_path / "cut"), steps=2, **kw)  # its disk tier is cut/disk
    shutil.move(tmp_path / "cut", tmp_path / "moved")
    finetune(out=str(tmp_path / "moved"), steps=4, resume=True, **kw)
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "moved"))


def test_the_disk_tier_is_a_store_export_and_generate_can_use(task, tmp_path, capsys):
    """OUT/disk holds the fine-tuned blocks and, now, the tokenizer: `zo2tier export OUT/disk DIR` writes a
    whole Hugging Face folder, and `zo2tier generate --model OUT/disk` runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "o"
    finetune(out=str(out), steps=2, budget="device=1GiB,host=1GiB,disk=1GiB", placement=PLACES, **task)
    assert cli.main(["export", str(out / "disk"), str(tmp_path / "exported")]) == 0
    assert _same(load_file(tmp_path / "exported/model.safetensors"), _weights(out))
    AutoTokenizer.from_pretrained(tmp_path / "exported")
    AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(out / "disk"), "--prompt", "good film", "--max-new-tokens", "2",
                     "--budget", "device=1GiB"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_narrow_tiers_written_back_lazily_export_what_was_tested(task, tmp_path):
    """bf16 / int8 tiers written back every 4th visit: the final weights are rounded into their tiers before the
    last evaluation, so OUT/model is exactly what `zo2tier export OUT/disk` gives."""
    for storage in ({"host": "bf16", "disk": "bf16"}, {"disk": "int8"}):
        out = tmp_path / storage["disk"]
        finetune(out=str(out), steps=6, budget="device=1GiB,host=1GiB,disk=1GiB", placement=PLACES,
                 storage=storage, write_back_every=4, **task)
        assert cli.main(["export", str(out / "disk"), str(out / "exported")]) == 0
        assert _same(load_file(out / "exported/model.safetensors"), _weights(out))


def test_an_out_whose_model_folder_is_the_users_is_refused(task, tmp_path):
    (tmp_path / "o/model").mkdir(parents=True)
    (tmp_path / "o/model/weights.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="model/ folder holds files a fine-tune did not write"):
            finetune(out=str(tmp_path / "o"), steps=1, budget="device=1GiB", overwrite=overwrite, **task)
    assert (tmp_path / "o/model/weights.txt").read_text() == "mine"
