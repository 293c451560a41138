"""Hyper-parameters of MeZO-SGD, validated once at the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass

PERTURBATIONS = ("gaussian", "rademacher")


@dataclass(frozen=True)
class MeZOConfig:
    """MeZO-SGD settings.

    Each step estimates ``g = (L(θ+εz) − L(θ−εz)) / 2ε`` and applies ``θ ← θ − lr·(g·z + wd·θ)``
    (no decay on biases and norm weights). z is regenerated from ``(seed, step, parameter id)``.

    ``estimator`` and ``n_perturbations`` choose how a step estimates (``zo2tier/zo/estimators.py``,
    docs/estimators.md): ``"mezo"`` with q = 1 is MeZO-SGD; q > 1 perturbations are evaluated while each
    block is resident, so they cost one upload. ``n_perturbations="auto"`` lets the engine pick the largest
    q whose extra compute hides under the plan's transfers, never below the estimator's steady q
    (``default_perturbations``: FZOO 8) unless device memory forces it. Unlike ``zo2tier finetune``, the
    config has no per-estimator lr default: FZOO wants about 3e-4, not 1e-6. ``perturbation=None`` takes the estimator's z
    distribution (Gaussian for mezo).

    Example::

        cfg = MeZOConfig(lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0)
        cfg = MeZOConfig(estimator="mezo", n_perturbations=4)
    """

    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    perturbation: str | None = None
    estimator: str = "mezo"
    n_perturbations: int | str = 1

    def __post_init__(self) -> None:
        from zo2tier.zo.estimators import ESTIMATORS

        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is unknown; use one of {', '.join(sorted(ESTIMATORS))}")
        q, low = self.n_perturbations, ESTIMATORS[self.estimator].min_perturbations
        if q != "auto" and (isinstance(q, bool) or not isinstance(q, int) or q < low):
            raise ValueError(f"n_perturbations={q!r} must be an int >= {low} for estimator={self.estimator!r}, "
                             "or 'auto'")
        needed = ESTIMATORS[self.estimator].perturbation
        if self.perturbation is None:
            object.__setattr__(self, "perturbation", needed or "gaussian")
        elif needed is not None and self.perturbation != needed:
            raise ValueError(f"estimator={self.estimator!r} needs perturbation={needed!r}, got "
                             f"{self.perturbation!r}; drop perturbation= or pass {needed!r}")
        _finite("lr", self.lr)
        _finite("eps", self.eps)
        _finite("weight_decay", self.weight_decay)
        if self.lr < 0:
            raise ValueError(f"lr={self.lr} is negative; use lr >= 0 (MeZO full fine-tunes use 1e-7 to 1e-6)")
        if self.eps <= 0:
            raise ValueError(f"eps={self.eps} must be > 0; the default 1e-3 suits fp16/bf16/fp32 models")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} is negative; use 0 or a small positive value")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} must be an int in [0, 2**32)")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(
                f"perturbation={self.perturbation!r} is unknown; use one of {', '.join(PERTURBATIONS)}"
            )


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")


# The CUDA caching allocator setting the zo2tier commands use unless PYTORCH_CUDA_ALLOC_CONF is set: growable
# segments keep reserved memory close to what is allocated. OPT-13B, every block in host RAM, on the H100:
# 4.23 GiB NVML peak with it, 4.53 without (benchmarks/step_h100.jsonl, git f75d9d6).
CUDA_ALLOC_CONF = "expandable_segments:True"


def set_cuda_allocator_default() -> None:
    """Use :data:`CUDA_ALLOC_CONF` unless the user chose a setting. Call it before CUDA is first used."""
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)

