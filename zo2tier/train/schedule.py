"""Learning-rate schedules over a run's steps (light: the CLI imports it to list the choices)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine", "wsd")
WSD_DECAY = 0.2  # wsd: the last fifth of the steps decays the lr linearly to 0


def lr_at(step: int, *, lr: float, steps: int, schedule: str) -> float:
    """The learning rate of step ``step`` (0-based) under ``schedule``: ``constant``; ``linear`` or ``cosine``
    decay to 0 over ``steps``; ``wsd`` (warmup-stable-decay without the warmup) holds ``lr`` and decays it
    linearly to 0 over the last :data:`WSD_DECAY` of the steps. Until that tail wsd equals constant, so a
    constant run's checkpoint can go on as a wsd run of the same lr, exactly."""
    frac = step / max(1, steps)
    if schedule == "linear":
        return lr * (1.0 - frac)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "wsd":
        stable = wsd_stable_steps(steps)
        return lr if step < stable else lr * (steps - step) / max(1, steps - stable)
    return lr


def wsd_stable_steps(steps: int) -> int:
    """The steps a ``wsd`` schedule over ``steps`` holds its lr for (the decay starts at this 0-based step)."""
    return steps - max(1, round(steps * WSD_DECAY))
