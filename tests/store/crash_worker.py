"""A tiered fine-tune that checkpoints every step; the crash test SIGKILLs it and resumes it."""

from __future__ import annotations

import os

import torch

CFG = {"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01, "seed": 7}
STORAGE = {"host": "bf16", "disk": "fp16"}
BUDGET = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}


def placement(names):
    tiers = ["device", "host", "disk", "disk"]
    return {n: tiers[i % len(tiers)] for i, n in enumerate(names)}


def run(store: str, ckpt: str, n_steps: int, out: str, fault_delay_s: float = 0.0) -> None:
    from tiny_models import tiny_batch

    import zo2tier
    from zo2tier.store import blockstore

    blockstore._fault_delay_s = fault_delay_s
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    if os.path.exists(os.path.join(ckpt, "checkpoint.json")):
        engine = zo2tier.ZOEngine.resume(ckpt)
        start, losses = engine.extra_state["step"], engine.extra_state["losses"]
    else:
        from zo2tier.store.format import read_manifest

        names = [b.name for b in read_manifest(store).blocks[:-1]]
        engine = zo2tier.ZOEngine.from_store(store, budget=BUDGET, config=zo2tier.MeZOConfig(**CFG),
                                             placement=placement(names), storage=STORAGE, write_back_every=2)
        start, losses = 0, []
    for t in range(start, n_steps):
        r = engine.step(tiny_batch(seed=100 + t))
        losses.append([r.loss_plus, r.loss_minus])
        engine.save_checkpoint(ckpt, extra_state={"step": t + 1, "losses": losses})
    state = engine.state_dict()
    engine.close()
    torch.save({"state": state, "losses": losses}, out)
