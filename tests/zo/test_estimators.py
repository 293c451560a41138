"""Estimators as pure math: each one's log entries against a hand computation."""

from __future__ import annotations

import math

import pytest

from zo2tier.config import MeZOConfig
from zo2tier.zo.estimators import ESTIMATORS, FZOO, FZOOEMA, Group, MeZO, make_estimator
from zo2tier.zo.update import LogEntry

SEEDS = [11, 22, 33, 44]


def test_mezo_q1_is_the_old_step_bit_for_bit():
    """q = 1: g = (L+ − L−)/(2ε) as the engine computed it before estimators, lr not divided."""
    lp, lm, eps, lr, wd = 2.718281828, 2.718281007, 1e-3, 1e-6, 0.01
    est = MeZO(1).estimate([lp, lm], start=7, seeds=[99], eps=eps, lr=lr, weight_decay=wd)
    g = (lp - lm) / (2 * eps)
    assert est.entries == (LogEntry(7, 99, g, lr, wd),)
    assert (est.loss_plus, est.loss_minus, est.projected_grad, est.skipped) == (lp, lm, g, False)
    assert MeZO(1).groups() == (Group(0, 1.0), Group(0, -1.0))


def test_mezo_q3_averages_three_two_sided_estimates():
    losses = [1.0, 0.5, 2.0, 2.25, 3.0, 3.0]  # (+, −) per perturbation
    est = MeZO(3).estimate(losses, start=10, seeds=SEEDS[:3], eps=0.25, lr=3.0, weight_decay=0.0)
    assert [e.projected_grad for e in est.entries] == [1.0, -0.5, 0.0]  # (L+ − L−) / 0.5
    assert [e.lr for e in est.entries] == [1.0, 1.0, 1.0]  # lr / q per entry
    assert [(e.step, e.step_seed) for e in est.entries] == [(10, 11), (11, 22), (12, 33)]
    assert est.loss_plus == 2.0 and est.loss_minus == pytest.approx(5.75 / 3)
    assert est.projected_grad == pytest.approx(0.5 / 3)
    assert MeZO(3).groups() == tuple(Group(k, s) for k in range(3) for s in (1.0, -1.0))


def test_fzoo_normalises_by_the_spread_of_the_perturbed_losses():
    # clean 2.0; perturbed 2.1, 1.9, 2.3, 1.7: mean 2.0, population std sqrt((.01+.01+.09+.09)/4) = sqrt(.05)
    losses = [2.0, 2.1, 1.9, 2.3, 1.7]
    est = FZOO(4).estimate(losses, start=0, seeds=SEEDS, eps=1e-3, lr=1e-5, weight_decay=0.0)
    sigma = math.sqrt(0.05)
    want = [0.1 / sigma, -0.1 / sigma, 0.3 / sigma, -0.3 / sigma]
    assert [e.projected_grad for e in est.entries] == pytest.approx(want, rel=1e-12)
    assert [e.lr for e in est.entries] == [1e-5 / 4] * 4
    assert est.loss_plus == 2.0 and est.loss_minus == pytest.approx(2.0)
    assert FZOO(4).groups() == (Group(None, 1.0), *(Group(k, 1.0) for k in range(4)))
    assert FZOO.perturbation == "rademacher" and FZOO.n_copies(4) == 5 and MeZO.n_copies(4) == 8


def test_fzoo_step_is_scale_free():
    """Scaling every loss difference (a larger ε, a steeper loss) leaves the step unchanged."""
    base = [3.0, 3.01, 2.98, 3.02]
    scaled = [3.0 + 7.0 * (x - 3.0) for x in base]
    a = FZOO(3).estimate(base, start=0, seeds=SEEDS[:3], eps=1e-3, lr=1.0, weight_decay=0.0)
    b = FZOO(3).estimate(scaled, start=0, seeds=SEEDS[:3], eps=7e-3, lr=1.0, weight_decay=0.0)
    assert [e.projected_grad for e in a.entries] == pytest.approx([e.projected_grad for e in b.entries], rel=1e-9)


def test_fzoo_zero_spread_logs_a_zero_step_not_a_nan():
    est = FZOO(3).estimate([1.5, 1.25, 1.25, 1.25], start=4, seeds=SEEDS[:3], eps=1e-3, lr=1e-5, weight_decay=0.1)
    assert [e.projected_grad for e in est.entries] == [0.0, 0.0, 0.0]
    assert [e.lr for e in est.entries] == [1e-5 / 3] * 3  # weight decay still applies, as a tied MeZO step's
    assert not est.skipped


def test_fzoo_needs_two_perturbations():
    with pytest.raises(ValueError, match=r"'fzoo' needs n_perturbations >= 2, got 1; pass n_perturbations=2"):
        FZOO(1)
    with pytest.raises(ValueError, match="needs n_perturbations >= 2"):
        make_estimator("fzoo", 1)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_skips_the_step(name, bad):
    est_obj = make_estimator(name, 3)
    n = len(est_obj.groups())
    for i in range(n):  # a bad loss in any copy
        losses = [2.0 + 0.01 * j for j in range(n)]
        losses[i] = bad
        est = est_obj.estimate(losses, start=0, seeds=SEEDS[:3], eps=1e-3, lr=1e-5, weight_decay=0.01)
        assert est.skipped and est.projected_grad == 0.0
        assert all(e.projected_grad == 0.0 and e.lr == 0.0 for e in est.entries)
        assert all(e.weight_decay == 0.01 for e in est.entries)  # lr 0: nothing reaches the weights


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_lr_zero_logs_lr_zero_entries(name):
    est_obj = make_estimator(name, 2)
    losses = [2.0 + 0.01 * j for j in range(len(est_obj.groups()))]
    est = est_obj.estimate(losses, start=0, seeds=SEEDS[:2], eps=1e-3, lr=0.0, weight_decay=0.5)
    assert all(e.lr == 0.0 for e in est.entries) and not est.skipped


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_wrong_number_of_losses_or_seeds_is_refused(name):
    est_obj = make_estimator(name, 2)
    with pytest.raises(ValueError, match="expected .* losses and 2 seeds"):
        est_obj.estimate([1.0], start=0, seeds=SEEDS[:2], eps=1e-3, lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="expected .* losses and 2 seeds"):
        est_obj.estimate([1.0] * len(est_obj.groups()), start=0, seeds=SEEDS[:1], eps=1e-3, lr=1.0,
                         weight_decay=0.0)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_groups_cover_each_perturbation_and_count_copies(name):
    cls = ESTIMATORS[name]
    est_obj = cls(3)
    groups = est_obj.groups()
    assert len(groups) == cls.n_copies(3)
    assert {g.k for g in groups if g.k is not None} == {0, 1, 2}


@pytest.mark.parametrize("name", ["mezo", "fzoo"])
def test_stateless_estimators_refuse_state(name):
    est_obj = make_estimator(name, 2)
    assert est_obj.state_dict() == {}
    est_obj.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        est_obj.load_state_dict({"v": 1.0})


def test_config_takes_fzoo_and_its_rademacher_z():
    cfg = MeZOConfig(estimator="fzoo", n_perturbations=8)
    assert cfg.perturbation == "rademacher"
    with pytest.raises(ValueError, match="needs perturbation='rademacher'"):
        MeZOConfig(estimator="fzoo", n_perturbations=8, perturbation="gaussian")


def test_fzoo_ema_tracks_the_spread_across_steps_by_hand():
    est = FZOOEMA(2)  # beta 0.9
    a = est.estimate([2.0, 2.1, 1.9], start=0, seeds=SEEDS[:2], eps=1e-3, lr=1e-4, weight_decay=0.0)
    # s2 = (0.01 + 0.01) / 2; v1 = 0.1 * s2 = 0.001; v_hat = 0.001 / 0.1 = 0.01; scale 0.1
    assert [e.projected_grad for e in a.entries] == pytest.approx([1.0, -1.0], rel=1e-9)
    assert [e.lr for e in a.entries] == [5e-5, 5e-5]
    assert est.state_dict() == pytest.approx({"v": 0.001, "t": 1})
    b = est.estimate([3.0, 3.3, 2.9], start=2, seeds=SEEDS[2:4], eps=1e-3, lr=1e-4, weight_decay=0.0)
    v_hat = (0.9 * 0.001 + 0.1 * 0.05) / (1 - 0.81)  # s2 = (0.09 + 0.01) / 2
    assert [e.projected_grad for e in b.entries] == pytest.approx([0.3 / math.sqrt(v_hat), -0.1 / math.sqrt(v_hat)],
                                                                  rel=1e-9)
    assert b.loss_plus == 3.0 and b.loss_minus == pytest.approx(3.1)


def test_fzoo_ema_works_at_q1_and_skips_keep_its_state():
    est = FZOOEMA(1)
    first = est.estimate([1.0, 1.02], start=0, seeds=[5], eps=1e-3, lr=1e-4, weight_decay=0.0)
    assert first.entries[0].projected_grad == pytest.approx(1.0) and first.entries[0].lr == 1e-4  # q=1: full lr
    state = est.state_dict()
    skipped = est.estimate([1.0, math.nan], start=1, seeds=[6], eps=1e-3, lr=1e-4, weight_decay=0.0)
    assert skipped.skipped and skipped.entries[0].lr == 0.0 and est.state_dict() == state
    zero = FZOOEMA(2).estimate([1.0, 1.0, 1.0], start=0, seeds=SEEDS[:2], eps=1e-3, lr=1e-4, weight_decay=0.0)
    assert [e.projected_grad for e in zero.entries] == [0.0, 0.0] and not zero.skipped


def test_fzoo_ema_state_round_trips_and_resumes_identically():
    steps = [[2.0, 2.1, 1.9], [3.0, 3.3, 2.9], [2.5, 2.4, 2.55]]
    full = FZOOEMA(2)
    ref = [full.estimate(x, start=2 * i, seeds=SEEDS[:2], eps=1e-3, lr=1e-4, weight_decay=0.0)
           for i, x in enumerate(steps)]
    first = FZOOEMA(2)
    first.estimate(steps[0], start=0, seeds=SEEDS[:2], eps=1e-3, lr=1e-4, weight_decay=0.0)
    import json

    resumed = FZOOEMA(2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through a JSON checkpoint
    got = [resumed.estimate(x, start=2 * (i + 1), seeds=SEEDS[:2], eps=1e-3, lr=1e-4, weight_decay=0.0)
           for i, x in enumerate(steps[1:])]
    assert [e.entries for e in got] == [e.entries for e in ref[1:]]
    with pytest.raises(ValueError, match="needs keys v and t"):
        resumed.load_state_dict({})
    with pytest.raises(ValueError, match="not a finite v >= 0"):
        resumed.load_state_dict({"v": -1.0, "t": 3})


@pytest.mark.parametrize(("name", "q", "lr"), [("mezo", 1, 2e-3), ("mezo", 4, 2e-3), ("fzoo", 4, 2e-2),
                                               ("fzoo-ema", 1, 2e-2), ("fzoo-ema", 4, 2e-2)])
def test_each_estimator_descends_a_quadratic(name, q, lr):
    """The logged entries, replayed as θ ← θ − lr_k·g_k·z_k, lower L(θ) = ½‖Aθ‖² (a sign or scale slip would not)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    d = 200
    a = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    theta = torch.randn(d, generator=gen, dtype=torch.float64)

    def loss(x):
        return float(0.5 * ((a * x) ** 2).sum())

    est = make_estimator(name, q)
    start_loss = loss(theta)
    for step in range(300):
        zs = [(torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1)
              if est.perturbation == "rademacher" else torch.randn(d, generator=gen, dtype=torch.float64)
              for _ in range(q)]
        losses = [loss(theta if g.k is None else theta + g.sign * 1e-3 * zs[g.k]) for g in est.groups()]
        out = est.estimate(losses, start=step * q, seeds=list(range(q)), eps=1e-3, lr=lr, weight_decay=0.0)
        for k, e in enumerate(out.entries):
            theta = theta - e.lr * e.projected_grad * zs[k]
    assert loss(theta) < 0.5 * start_loss, (start_loss, loss(theta))  # a flipped sign would climb
