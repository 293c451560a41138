"""Issue 8, item 4: a NaN or inf loss in either perturbed pass skips the step's update: it is logged,
counted in the step result, and never reaches the weights."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import BIG, CFG, spread
from tiny_models import tiny_model

import zo2tier

BLOCK = "model.layers.2"


def _poison(value: float, half: str):
    """A forward hook that writes ``value`` into the plus half, the minus half, or both of a layer's output."""
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        rows = hidden.shape[0] // 2
        target = {"plus": hidden[:rows], "minus": hidden[rows:], "both": hidden}[half]
        target.fill_(value)
        return output

    return hook


@pytest.mark.parametrize(("value", "half"), [(float("nan"), "both"), (float("nan"), "minus"),
                                              (float("inf"), "plus")])
def test_non_finite_loss_skips_the_update(tmp_path, batch, caplog, value, half):
    model = tiny_model("llama")
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=CFG, placement=spread(model)) as engine:
        engine.step(batch)
        before = engine.state_dict()
        # the engine replaced the layer by a proxy; hooks go on what the model now holds
        handle = engine.model.get_submodule(BLOCK).register_forward_hook(_poison(value, half))
        with caplog.at_level(logging.WARNING, logger="zo2tier"):
            result = engine.step(batch)
        handle.remove()
        assert result.skipped and result.n_skipped == 1
        assert not (torch.isfinite(torch.tensor([result.loss_plus, result.loss_minus])).all())
        assert result.projected_grad == 0.0
        assert any("skipped" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)
        after = engine.state_dict()
        for key in before:
            assert torch.equal(before[key], after[key]), key  # the skipped step changed nothing

        follow = engine.step(batch)  # training goes on, the count stays
        assert not follow.skipped and follow.n_skipped == 1
        final = engine.state_dict()
        assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
        assert any(not torch.equal(final[k], after[k]) for k in after)
