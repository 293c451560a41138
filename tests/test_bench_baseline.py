"""The plain-MeZO references of tools/bench_step.py: the in-place step the bars use, and the out-of-place step
written as MeZO's own trainer writes it, do the same arithmetic."""

import importlib.util
import os

import torch
from transformers import OPTConfig, OPTForCausalLM

_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "bench_step.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(seed):
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16)
    return OPTForCausalLM(cfg).double().eval()


def test_in_place_and_out_of_place_baselines_agree():
    bench = _bench()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    a = bench.Baseline(_model(1), torch.device("cpu"))
    b = bench.Baseline(_model(1), torch.device("cpu"))
    start = [p.detach().clone() for p in a.params]
    with torch.no_grad():
        for seed in range(3):
            la = a.step(ids, seed, "inplace", eps=1e-3, lr=1e-2)
            lb = b.step(ids, seed, "out-of-place", eps=1e-3, lr=1e-2)
            assert abs(la[0] - lb[0]) < 1e-9 and abs(la[1] - lb[1]) < 1e-9
    moved = 0.0
    for p, q, s in zip(a.params, b.params, start):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)  # the same steps, only rounded differently
        moved = max(moved, (p - s).abs().max().item())
    assert moved > 1e-6  # the steps did move the weights
