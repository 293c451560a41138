"""Memory budgets: size strings become a frozen :class:`TierBudget` here, and nowhere else.

Size strings follow the Hugging Face accelerate conventions: ``"GiB"`` is 2**30 bytes,
``"GB"`` is 10**9 bytes, and a plain int is a number of bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

TIERS = ("device", "host", "disk")

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")

SizeLike = int | str
MAX_BYTES = 2**63 - 1  # sizes must fit in an int64 (8 EiB); anything larger is a typo


def parse_size(value: SizeLike, *, what: str = "size") -> int:
    """Parse ``"24GiB"``, ``"500GB"``, ``"1.5 TiB"`` or a plain int into bytes.

    >>> parse_size("1KiB"), parse_size("1KB"), parse_size(7)
    (1024, 1000, 7)

    Raises ValueError (naming ``what`` and the value) for negative, non-finite or unparseable input.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not a size; use bytes (int) or a string like '8GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} {value!r} is negative; use a size >= 0 such as '8GiB'")
        return _check_max(value, value, what)
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not a size; use bytes (int) or a string like '8GiB'")
    match = _SIZE_RE.match(value)
    if match is None and value.strip().startswith("-"):
        raise ValueError(f"{what} {value!r} is negative; use a size >= 0 such as '8GiB'")
    if match is None:
        raise ValueError(
            f"{what} {value!r} is not a size; write a number and a unit, e.g. '8GiB' (2**30) or '500GB' (10**9)"
        )
    number, unit = match.groups()
    factor = _UNITS.get(unit.upper())
    if factor is None:
        known = ", ".join(u for u in _UNITS if u)
        raise ValueError(f"{what} {value!r} has unknown unit {unit!r}; use one of {known}")
    return _check_max(int(Fraction(number) * factor), value, what)  # exact: no float overflow or rounding


def _check_max(n_bytes: int, value: SizeLike, what: str) -> int:
    if n_bytes > MAX_BYTES:
        raise ValueError(f"{what} {value!r} is larger than 8 EiB; check the number and the unit (e.g. '8GiB')")
    return n_bytes


def format_size(n_bytes: int) -> str:
    """Human-readable binary size, e.g. ``format_size(3 * 2**30) == '3.00 GiB'``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TierBudget:
    """Bytes each tier may hold.

    Example::

        TierBudget.parse({"device": "8GiB", "host": "16GiB", "disk": "100GiB"})
        TierBudget.parse("device=8GiB,host=16GiB,disk=100GiB")   # the CLI spelling
    """

    device_bytes: int
    host_bytes: int = 0
    disk_bytes: int = 0

    def __post_init__(self) -> None:
        for tier in TIERS:
            value = getattr(self, f"{tier}_bytes")
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BYTES:
                raise ValueError(f"{tier} budget {value!r} must be a byte count >= 0 and below 8 EiB, e.g. 8 * 2**30")

    def of(self, tier: str) -> int:
        """Bytes allowed on ``tier`` ("device", "host" or "disk")."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; use one of {', '.join(TIERS)}")
        return getattr(self, f"{tier}_bytes")

    def as_dict(self) -> dict[str, int]:
        """``{"device": bytes, "host": bytes, "disk": bytes}``, as a checkpoint saves it."""
        return {t: self.of(t) for t in TIERS}

    @classmethod
    def parse(cls, budget: BudgetLike) -> TierBudget:
        """Accept a TierBudget, a mapping of tier -> size, or ``"device=8GiB,host=16GiB,disk=100GiB"``."""
        if isinstance(budget, TierBudget):
            return budget
        if isinstance(budget, str):
            budget = _split_budget_string(budget)
        if not isinstance(budget, Mapping):
            raise ValueError(
                f"budget {budget!r} is not understood; pass a dict like {{'device': '8GiB', 'host': '16GiB'}}"
            )
        unknown = [k for k in budget if k not in TIERS]
        if unknown:
            raise ValueError(
                f"unknown budget key(s) {unknown}; use only {', '.join(TIERS)} "
                "(e.g. {'device': '8GiB', 'host': '16GiB', 'disk': '100GiB'})"
            )
        if "device" not in budget:
            raise ValueError("budget has no 'device' entry; give the compute device's bytes, e.g. device='8GiB'")
        sizes = {f"{t}_bytes": parse_size(budget.get(t, 0), what=f"{t} budget") for t in TIERS}
        return cls(**sizes)


BudgetLike = TierBudget | Mapping[str, SizeLike] | str


def _split_budget_string(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"budget entry {part!r} has no '='; write it as device=8GiB,host=16GiB,disk=100GiB")
        key = key.strip()
        if key in out:
            raise ValueError(f"budget names {key!r} twice in {text!r}; give each tier once")
        out[key] = value.strip()
    return out
