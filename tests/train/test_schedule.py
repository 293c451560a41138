"""zo2tier.train.schedule: each schedule's lr at chosen steps."""

from __future__ import annotations

import pytest

from zo2tier.train.schedule import SCHEDULES, lr_at, wsd_stable_steps


def test_wsd_holds_then_decays_linearly_over_the_last_fifth():
    assert wsd_stable_steps(10) == 8 and wsd_stable_steps(3) == 2 and wsd_stable_steps(1) == 0
    lrs = [lr_at(s, lr=1.0, steps=10, schedule="wsd") for s in range(10)]
    assert lrs == [1.0] * 8 + [1.0, 0.5]  # equal to constant until the decay: a constant run can go on as wsd
    assert lr_at(2599, lr=3e-4, steps=2600, schedule="wsd") == pytest.approx(3e-4 / 520)


def test_each_schedule_starts_at_lr():
    assert all(lr_at(0, lr=2.0, steps=7, schedule=s) == 2.0 for s in SCHEDULES)
    assert lr_at(5, lr=2.0, steps=10, schedule="linear") == 1.0
    assert lr_at(5, lr=2.0, steps=10, schedule="cosine") == pytest.approx(1.0)
