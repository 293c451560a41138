"""Estimators: which perturbed copies of the batch a step runs, and how their losses become log entries.

A step runs the model once on the batch repeated ``len(estimator.groups())`` times along dim 0. Copy ``i``
sees the weights ``θ + sign_i·ε·z_{k_i}`` (``k_i is None``: θ itself), with ``z_k`` keyed by
``seeds[k] = step_seed(config.seed, start + k)`` where ``start`` is the log's length before the step. The
estimator turns the copies' losses into log entries ``(start + k, seeds[k], g_k, lr_k, weight_decay)``,
one per perturbation, so the log stays a list of ``(seed, g)`` pairs that replays exactly anywhere.

Pure math: no tensors, no I/O. A new estimator is one subclass of :class:`Estimator` registered in
:data:`ESTIMATORS`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from zo2tier.zo.update import LogEntry


@dataclass(frozen=True)
class Group:
    """One copy of the batch in a step's forward: weights ``θ + sign·ε·z_k``; ``k=None`` is θ itself."""

    k: int | None
    sign: float


@dataclass(frozen=True)
class Estimate:
    """What a step logs and reports. ``entries`` are appended to the update log as they are."""

    entries: tuple[LogEntry, ...]
    loss_plus: float  # reported: the mean loss of the +ε copies (the clean copy for one-sided estimators)
    loss_minus: float  # reported: the mean loss of the −ε copies (the mean of the +ε copies, one-sided)
    projected_grad: float  # reported: the mean of the logged g_k
    skipped: bool  # a non-finite loss: every entry carries g = 0 and lr = 0, so nothing reaches the weights


class Estimator(ABC):
    """How a step perturbs and what it logs. Subclasses set ``name`` and implement the two methods.

    ``perturbation``: the z distribution the estimator needs ("gaussian" / "rademacher"), or None to use
    the config's. ``min_perturbations``: the smallest q it is defined for. ``default_perturbations``: the
    smallest q to train steadily (measured for fzoo; 1 where q = 1 is the method's own form):
    ``zo2tier finetune``'s default, and the floor of ``q="auto"``
    (only the device memory left takes auto below it). ``default_lr``: ``zo2tier finetune``'s learning rate
    when none is given (docs/estimators.md says how each was chosen). ``one_sided``: its groups are the
    clean copy plus one copy per perturbation (q + 1 copies), else two per perturbation (2q copies).
    Estimators here keep no state between steps; one that did would return it from :meth:`state_dict`
    (a few JSON-able scalars, saved with the checkpoint) and take it back in :meth:`load_state_dict`.
    """

    name: ClassVar[str]
    perturbation: ClassVar[str | None] = None
    min_perturbations: ClassVar[int] = 1
    default_perturbations: ClassVar[int] = 1
    default_lr: ClassVar[float] = 1e-6
    one_sided: ClassVar[bool] = False

    def __init__(self, n_perturbations: int = 1) -> None:
        if isinstance(n_perturbations, bool) or not isinstance(n_perturbations, int) or n_perturbations < 1:
            raise ValueError(f"n_perturbations={n_perturbations!r} must be an int >= 1 (or 'auto' in MeZOConfig)")
        if n_perturbations < self.min_perturbations:
            raise ValueError(f"estimator {self.name!r} needs n_perturbations >= {self.min_perturbations}, got "
                             f"{n_perturbations}; pass n_perturbations={self.min_perturbations} or more, or 'auto'")
        self.n_perturbations = n_perturbations

    @classmethod
    def n_copies(cls, n_perturbations: int) -> int:
        """Copies of the batch one step runs with ``n_perturbations`` perturbations: q + 1 or 2q."""
        return n_perturbations + 1 if cls.one_sided else 2 * n_perturbations

    def state_dict(self) -> dict:
        """The estimator's state between steps (none here): JSON-able, saved with a checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back what :meth:`state_dict` returned; an estimator without state accepts only ``{}``."""
        if state:
            raise ValueError(f"estimator {self.name!r} keeps no state but the checkpoint gives {sorted(state)}; "
                             "resume with the estimator the checkpoint was saved with")

    @abstractmethod
    def groups(self) -> tuple[Group, ...]:
        """The copies of the batch one step runs, in the order they are stacked along dim 0."""

    @abstractmethod
    def grads(self, losses: Sequence[float], eps: float) -> tuple[list[float], float, float]:
        """``(g_k for each k, reported loss_plus, reported loss_minus)`` from the copies' losses."""

    def estimate(self, losses: Sequence[float], *, start: int, seeds: Sequence[int], eps: float, lr: float,
                 weight_decay: float) -> Estimate:
        """The log entries of one step from the losses of :meth:`groups` (same order)."""
        q = self.n_perturbations
        if len(losses) != len(self.groups()) or len(seeds) != q:
            raise ValueError(f"{self.name}: expected {len(self.groups())} losses and {q} seeds, "
                             f"got {len(losses)} and {len(seeds)}")
        g, loss_plus, loss_minus = self.grads(losses, eps)
        skipped = not all(math.isfinite(x) for x in (*losses, *g))
        lr_k = 0.0 if skipped else (lr if q == 1 else lr / q)
        entries = tuple(LogEntry(start + k, seeds[k], 0.0 if skipped else g[k], lr_k, weight_decay)
                        for k in range(q))
        mean_g = 0.0 if skipped else (g[0] if q == 1 else math.fsum(g) / q)
        return Estimate(entries, loss_plus, loss_minus, mean_g, skipped)


class MeZO(Estimator):
    """Two-sided SPSA averaged over q perturbations (MeZO-SGD at q = 1).

    ``g_k = (L(θ+εz_k) − L(θ−εz_k)) / 2ε``; update ``θ ← θ − (lr/q)·Σ_k (g_k·z_k + wd·θ)``.
    """

    name = "mezo"

    def groups(self) -> tuple[Group, ...]:
        return tuple(Group(k, s) for k in range(self.n_perturbations) for s in (1.0, -1.0))

    def grads(self, losses: Sequence[float], eps: float) -> tuple[list[float], float, float]:
        plus, minus = losses[0::2], losses[1::2]
        g = [(lp - lm) / (2 * eps) for lp, lm in zip(plus, minus)]
        q = self.n_perturbations
        if q == 1:
            return g, plus[0], minus[0]
        return g, math.fsum(plus) / q, math.fsum(minus) / q


class FZOO(Estimator):
    """FZOO (Dang et al., ICLR 2026): q one-sided Rademacher estimates, the step normalised by the losses' spread.

    Copies: θ, then θ + εz_k for k = 1..q, with z_k ∈ {±1}^d. With ``l_0`` the clean loss and
    ``σ = sqrt(mean_k (l_k − mean(l))²)`` (the population standard deviation of the q perturbed losses)::

        g_k = (l_k − l_0) / σ;    θ ← θ − (lr/q)·Σ_k (g_k·z_k + wd·θ)

    as the authors' code does it (``trainer.py``, ``zo_step``/``zo_update``). Their paper writes
    ``g = Σ_k (l_k − l_0)·z_k / (εq)`` and steps by ``lr·g/σ``, which is the same rule with lr scaled by 1/ε;
    we keep the code's scale-free form: ``l_k − l_0`` and σ both scale with ε and with the loss, so each
    coordinate moves by about ``lr`` per step whatever they are (normalised SGD), and lr reads as a step
    size in weight units (the authors use 1e-5 for OPT-1.3B, 10x MeZO's). σ = 0 (every perturbed loss the
    same) carries no direction: every g_k is 0 (weight decay still applies, as in a MeZO step whose two
    losses tie). Needs q >= 2 to have a spread.
    """

    name = "fzoo"
    perturbation = "rademacher"
    min_perturbations = 2
    # q = 3 (what auto chose for SmolLM2 on disk) did not train on the tweets: σ from three losses swings the
    # step (mean test 0.749 after ~2,560 steps); q = 8 gained 6.4 points in 1,500. lr 3e-4: the best mean
    # final dev accuracy of 3e-4 and 1e-3 over 3 seeds (benchmarks/time_to_accuracy.jsonl, H200)
    default_perturbations = 8
    default_lr = 3e-4
    one_sided = True

    def groups(self) -> tuple[Group, ...]:
        return (Group(None, 1.0), *(Group(k, 1.0) for k in range(self.n_perturbations)))

    def grads(self, losses: Sequence[float], eps: float) -> tuple[list[float], float, float]:
        clean, perturbed = losses[0], list(losses[1:])
        q = self.n_perturbations
        mean = math.fsum(perturbed) / q
        sigma = math.sqrt(math.fsum((lk - mean) ** 2 for lk in perturbed) / q)
        if sigma == 0.0:  # no spread, no direction (a non-finite loss still makes the step skipped)
            return [0.0] * q, clean, mean
        return [(lk - clean) / sigma for lk in perturbed], clean, mean


class FZOOEMA(Estimator):
    """FZOO's normalised one-sided step with the loss spread tracked across steps: one scalar of state.

    Copies: θ, then θ + εz_k (Rademacher), as :class:`FZOO`. Each step measures the spread about the clean
    loss, ``s² = mean_k (l_k − l_0)²``, and keeps its moving average, bias-corrected as Adam's second moment::

        v_t = β·v_{t−1} + (1 − β)·s²,   v̂ = v_t / (1 − β^t),   g_k = (l_k − l_0) / sqrt(v̂)

    then steps ``θ ← θ − (lr/q)·Σ_k (g_k·z_k + wd·θ)``. A scalar RMSprop on the directional derivatives
    (ZO-AdaMM's second moment, shared by every coordinate), so it needs no per-parameter state. Averaged over
    steps, the scale is steadier than FZOO's q-sample σ, and q = 1 works (two forwards a step, MeZO's cost).
    The spread is taken about ``l_0`` (not the mean of the l_k) so that q = 1 has one; the curvature
    offset it adds, ``mean(l) − l_0``, was 0.07 σ for SmolLM2 at ε = 1e-3 (docs/estimators.md).

    State: ``{"v": v_t, "t": t}``: two JSON scalars, saved with a checkpoint (:meth:`state_dict`). Replay
    never needs it (the log holds each step's g_k). A skipped step (non-finite loss) leaves it unchanged;
    ``v̂ = 0`` (every l_k equals l_0 so far) gives g = 0.
    """

    name = "fzoo-ema"
    perturbation = "rademacher"
    default_lr = 3e-4  # FZOO's normalised step, so FZOO's scale; not swept on its own
    one_sided = True
    beta: ClassVar[float] = 0.9

    def __init__(self, n_perturbations: int = 1) -> None:
        super().__init__(n_perturbations)
        self.v, self.t = 0.0, 0
        self._next: tuple[float, int] | None = None

    def groups(self) -> tuple[Group, ...]:
        return (Group(None, 1.0), *(Group(k, 1.0) for k in range(self.n_perturbations)))

    def grads(self, losses: Sequence[float], eps: float) -> tuple[list[float], float, float]:
        clean, perturbed = losses[0], list(losses[1:])
        q = self.n_perturbations
        spread = math.fsum((lk - clean) ** 2 for lk in perturbed) / q
        v, t = self.beta * self.v + (1.0 - self.beta) * spread, self.t + 1
        self._next = (v, t)
        v_hat = v / (1.0 - self.beta**t)
        mean = math.fsum(perturbed) / q
        if not v_hat > 0.0:  # 0 (no spread yet) or NaN (a non-finite loss: the step is skipped)
            return [0.0 if v_hat == 0.0 else math.nan] * q, clean, mean
        scale = math.sqrt(v_hat)
        return [(lk - clean) / scale for lk in perturbed], clean, mean

    def estimate(self, losses: Sequence[float], **kwargs) -> Estimate:
        est = super().estimate(losses, **kwargs)
        if not est.skipped and self._next is not None:
            self.v, self.t = self._next
        self._next = None
        return est

    def state_dict(self) -> dict:
        return {"v": self.v, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"v", "t"}:
            raise ValueError(f"estimator {self.name!r} state needs keys v and t, got {sorted(state)}; resume "
                             "from a checkpoint saved with this estimator")
        v, t = state["v"], state["t"]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 and isinstance(t, int) and t >= 0):
            raise ValueError(f"estimator {self.name!r} state {state!r} is not a finite v >= 0 and an int t >= 0")
        self.v, self.t = float(v), t


ESTIMATORS: dict[str, type[Estimator]] = {MeZO.name: MeZO, FZOO.name: FZOO, FZOOEMA.name: FZOOEMA}


def make_estimator(name: str, n_perturbations: int) -> Estimator:
    """The estimator called ``name`` with ``n_perturbations`` perturbations per step."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is unknown; use one of {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name](n_perturbations)
