"""Debug: which blocks differ between an all-on-device and a spread run on CUDA, and from when."""
import sys

sys.path.insert(0, "tests"); sys.path.insert(0, ".")
import tempfile

import torch
from test_engine import BIG, spread
from tiny_models import tiny_batch, tiny_model

import zo2tier


def run(placement, steps, K=1, evaluate=True):
    model = tiny_model("llama")
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)
    place = placement(zo2tier.ZOEngine.block_names(model)) if placement else None
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tempfile.mkdtemp(), device="cuda", config=cfg, placement=place, write_back_every=K) as e:
        for _ in range(steps): e.step(tiny_batch())
        if evaluate: e.evaluate(tiny_batch())
        return e.state_dict()

for steps in (0, 1, 2, 5):
    for ev in (False, True):
        a, b = run(None, steps, evaluate=ev), run(spread, steps, evaluate=ev)
        bad = sorted({k.split(".")[2] if "layers" in k else k for k in a if not torch.equal(a[k], b[k])})
        print("steps", steps, "eval", ev, "differ:", bad, max(float((a[k]-b[k]).abs().max()) for k in a))
