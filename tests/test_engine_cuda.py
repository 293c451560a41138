"""On a GPU, offloading is still invisible: host/disk blocks through the copy streams equal all-on-device."""

from __future__ import annotations

import pytest
import torch
from test_engine import BIG, spread
from tiny_models import tiny_batch, tiny_model

import zo2tier

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(arch, tmp_path, placement):
    model = tiny_model(arch)
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)
    place = placement(zo2tier.ZOEngine.block_names(model)) if placement else None
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, device="cuda", config=cfg, placement=place) as e:
        results = [e.step(tiny_batch()) for _ in range(5)]
        return results, e.evaluate(tiny_batch()), e.state_dict()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_cuda_tiers_match_all_on_device(arch, tmp_path):
    ref = _run(arch, tmp_path / "a", None)
    got = _run(arch, tmp_path / "b", spread)
    assert [(r.loss_plus, r.loss_minus) for r in ref[0]] == [(r.loss_plus, r.loss_minus) for r in got[0]]
    assert ref[1] == got[1]
    for key in ref[2]:
        assert torch.equal(ref[2][key], got[2][key]), key
