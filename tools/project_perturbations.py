"""The planner's projection of q = "auto" for OPT shapes in the transfer-bound regime (docs/estimators.md).

    python tools/project_perturbations.py                      # OPT-13B host fp16, OPT-30B int8 disk
    python tools/project_perturbations.py --batch=1 --seq=2048

No weights and no GPU: meta-device skeletons, ``zo2tier.predict.choose_perturbations`` with the H100
calibration (DESIGN.md §1; the 30B disk case with the raw O_DIRECT rates its own step record measured,
benchmarks/step_h100.jsonl), one JSON line per (model, estimator).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _options import parse_overrides

DEFAULTS = {"batch": 1, "seq": 2048, "device_budget": "8GiB"}
# (model, storage, tier every block goes to, write-back every K, measured rates to use): the regimes of
# DESIGN.md §6: OPT-13B fp16 every layer in host RAM, written back every step (0.54 s measured on the H200);
# OPT-30B int8 every layer on disk, written back every 16 steps (18.7-18.9 s measured; raw disk 1.73 / 2.26 GB/s)
CASES = (("opt-13b", "fp16", "host", 1, {}),
         ("opt-30b", "int8", "disk", 16, {"disk_read_gbps": 1.73, "disk_write_gbps": 2.26}))


def project(batch: int, seq: int, device_budget: str) -> list[dict]:
    from _shapes import model_config
    from scaling_report import plan_input

    from zo2tier.budget import TierBudget, parse_size
    from zo2tier.plan import plan_placement
    from zo2tier.predict import Calibration, choose_perturbations, predict_step

    out = []
    for name, storage, tier, k, rates in CASES:
        config = model_config(name)
        inp = dataclasses.replace(plan_input(config, storage), vocab_size=config.vocab_size)
        if storage == "int8":
            inp = dataclasses.replace(inp, storage={"device": "int8", "host": "int8", "disk": "int8"})
        budget = TierBudget(parse_size(device_budget), 10**13, 10**13)
        plan = plan_placement(inp, budget, {b.name: tier for b in inp.blocks})
        cal = Calibration(**rates)
        base = predict_step(inp, plan, cal, tokens=batch * seq, write_back_every=k)
        for estimator in ("mezo", "fzoo", "fzoo-ema"):
            c = choose_perturbations(inp, plan, cal, batch=batch, seq=seq, estimator=estimator, write_back_every=k)
            p = c.prediction
            out.append({"model": name, "storage": storage, "tier": tier, "write_back_every": k,
                        "estimator": estimator, "q": c.n_perturbations, "limit": c.limit,
                        "step_s": round(p.step_s, 4), "bound": p.bound, "compute_s": round(p.compute_s, 4),
                        "bus_s": round(p.bus_s, 4), "disk_s": round(p.disk_s, 4),
                        "mezo_q1_step_s": round(base.step_s, 4), "mezo_q1_compute_s": round(base.compute_s, 4),
                        "activation_gib": round(c.activation_bytes / 2**30, 2),
                        "device_left_gib": round(c.device_bytes_left / 2**30, 2),
                        "forward_passes_per_step": (c.n_perturbations + 1 if estimator != "mezo"
                                                    else 2 * c.n_perturbations)})
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_overrides(DEFAULTS, argv)
    for rec in project(cfg["batch"], cfg["seq"], cfg["device_budget"]):
        print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
