"""Debug: is the fused kernel's stochastic rounding unbiased for a constant offset?"""
import sys

sys.path.insert(0, ".")
import torch

from zo2tier.zo import fused

n = 1 << 20
for dtype in (torch.float16, torch.bfloat16):
    q = float(torch.finfo(dtype).eps)
    for frac in (0.3, -0.3, 0.01, -0.01):
        base = torch.full((n,), 1.5, dtype=dtype, device="cuda")
        x = torch.full((n,), 1.5 + frac * q, device="cuda")  # fp32 value to round
        out = torch.empty(n, dtype=dtype, device="cuda")
        plus = torch.empty(n, device="cuda")
        fused.arrive(x, param_id=1, decay=False, log=fused.PendingLog.build([], torch.device("cuda")), new_seed=0,
                     eps=0.0, plus=plus, minus=None, write_to=out, sr_seed=5, sr_key=3, sr_offset=0)
        
        print(dtype, frac, "mean change / q:", float((out.float() - base.float()).mean()) / q)
