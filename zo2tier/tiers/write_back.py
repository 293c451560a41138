"""How often a host or disk block is written back: K per tier, chosen from measured costs.

A block in host RAM or on disk is not rewritten every step. Its stored copy lags the update log, and the
pending entries are replayed on every arrival, so with write-back every K steps a block replays
(K + 1) / 2 steps per visit on average and writes once per K visits. Per block and step:

    cost(K) = t_replay * (K + 1) / 2 + t_write / K,   minimal at K* = sqrt(2 * t_write / t_replay)

where t_replay is one RNG pass over the block (``zo.kernels.apply_update_``) and t_write is encoding
the block plus moving it to its tier. ``tools/bench_writeback.py`` measures both; the numbers and the
choice below are in ``docs/io.md`` ("Update log and write-back").

>>> resolve_write_back(None, torch.device("cpu"))
{'host': 1, 'disk': 1}
>>> resolve_write_back({"disk": 16}, torch.device("cpu"))
{'host': 1, 'disk': 16}
>>> resolve_write_back(None, torch.device("cuda"), {"host": "int8"})
{'host': 8, 'disk': 16}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# On the CPU an RNG pass costs ~50-100x a block write (docs/io.md): write back every step.
# On CUDA, measured on the H100 machine (benchmarks/writeback_h100.json, 201M-parameter block): a replayed
# step costs 0.59 ms; a write-back 7.4 ms to pinned host and 122-129 ms to disk (fp16/bf16, whose
# stochastic rounding runs inside the fused kernel), so K* = sqrt(2 t_write / t_replay) is about 5 for
# the host tier and 20-25 for the disk tier. An int8 host tier was measured whole: OPT-13B steps on the H100
# with the Triton int8 encoder took 0.50 / 0.45 / 0.41 / ~0.5 s at K = 1 / 4 / 8 / 16 (docs/io.md), so
# DEFAULT_INT8_HOST_EVERY is 8.
DEFAULT_WRITE_BACK_EVERY: dict[str, dict[str, int]] = {
    "cpu": {"host": 1, "disk": 1},
    "cuda": {"host": 4, "disk": 16},
}
DEFAULT_INT8_HOST_EVERY = 8  # CUDA, host tier stored as int8
_TIERS = ("host", "disk")


def resolve_write_back(value: int | Mapping[str, int] | None, device: torch.device,
                       storage: Mapping[str, str] | None = None) -> dict[str, int]:
    """``write_back_every`` as given to the engine -> K per tier (``{"host": K, "disk": K}``).

    ``None`` takes the measured default for ``device`` (and the host tier's ``storage`` dtype on CUDA); an int
    applies to both tiers; a mapping overrides the default for the tiers it names.
    """
    out = dict(DEFAULT_WRITE_BACK_EVERY.get(device.type, DEFAULT_WRITE_BACK_EVERY["cuda"]))
    if device.type == "cuda" and (storage or {}).get("host") == "int8":
        out["host"] = DEFAULT_INT8_HOST_EVERY
    if value is None:
        return out
    given = {t: value for t in _TIERS} if not isinstance(value, Mapping) else dict(value)
    unknown = set(given) - set(_TIERS)
    if unknown:
        raise ValueError(f"write_back_every names unknown tier(s) {sorted(unknown)}; use host and/or disk "
                         "(device blocks are updated in place every step)")
    for tier, k in given.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"write_back_every={value!r}: K for {tier} must be an int >= 1, e.g. 16")
        out[tier] = k
    return out


def check_max_log(max_log: int | None) -> int | None:
    """``max_log``: write a block back once this many updates are pending, whatever K says (None: no cap)."""
    if max_log is not None and (isinstance(max_log, bool) or not isinstance(max_log, int) or max_log < 1):
        raise ValueError(f"max_log={max_log!r} must be an int >= 1 (or None for no limit beyond write_back_every)")
    return max_log
