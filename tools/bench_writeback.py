"""Replay one logged step vs write one block back: the two costs that set write_back_every (K).

For one block of NUMEL parameters (default: one OPT-6.7B decoder layer, 12 * 4096**2 = 201M, on CUDA;
4M on the CPU) this times

- replay_s: one RNG pass that applies one logged update (``zo.kernels.apply_update_``, fp32 working copy);
- per storage dtype: encode_s (stochastic rounding into the stored bytes), host_write_s (stored bytes
  device -> host buffer, pinned on CUDA), disk_write_s (O_DIRECT write + fsync of a block file, as the tier
  manager writes it) and disk_read_s;

and derives K* = sqrt(2 * t_write / replay_s) per tier, where a block written every K steps replays
(K + 1) / 2 steps per visit on average (see zo2tier/tiers/write_back.py). One JSON line on stdout.

    python tools/bench_writeback.py --device=cuda --numel=201326592 --disk_dir=/mnt/nvme/bench
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tempfile
import time

import torch
from _options import parse_overrides

from zo2tier.store.io import BlockFile, aligned_empty
from zo2tier.tiers.codec import encode, encoded_bytes
from zo2tier.zo.kernels import apply_update_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUMEL = 12 * 4096 * 4096 if DEVICE == "cuda" else 4 * 1024 * 1024
DTYPES = "fp32,bf16,fp16,int8"
REPEATS = 3
DISK_DIR = ""  # empty: a temporary directory under the current one (not /tmp, which may be tmpfs)
KIND = "gaussian"


def _args() -> dict:
    cfg = {"device": DEVICE, "numel": NUMEL, "dtypes": DTYPES, "repeats": REPEATS, "disk_dir": DISK_DIR, "kind": KIND}
    return parse_overrides(cfg)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` wall times of ``fn()`` in seconds (after one warm-up)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    cfg = _args()
    device = torch.device(cfg["device"])
    numel = cfg["numel"]
    work = torch.randn(numel, device=device) * 0.02
    replay_s = _timed(lambda: apply_update_(work, step_seed=7, param_id=3, lr=1e-7, projected_grad=0.5,
                                            weight_decay=0.0, kind=cfg["kind"]), device, cfg["repeats"])
    pin = device.type == "cuda"
    disk_dir = cfg["disk_dir"] or tempfile.mkdtemp(prefix=".bench_writeback_", dir=os.getcwd())
    os.makedirs(disk_dir, exist_ok=True)
    path = os.path.join(disk_dir, "block.bin")
    rows = {}
    for dtype in cfg["dtypes"].split(","):
        n_bytes = encoded_bytes(numel, dtype)
        raw = torch.empty(n_bytes, dtype=torch.uint8, device=device)
        host = aligned_empty(n_bytes, pin=pin)
        # the closures run inside this iteration (in _timed); defaults bind this iteration's values
        encode_s = _timed(lambda dtype=dtype, raw=raw: encode(work, dtype, raw, sr_seed=1, sr_key=2), device,
                          cfg["repeats"])
        host_s = _timed(lambda host=host, n_bytes=n_bytes, raw=raw: host[:n_bytes].copy_(raw), device,
                        cfg["repeats"])

        def write(host=host, n_bytes=n_bytes) -> None:
            with BlockFile.open(path, write=True, direct=True) as f:
                f.write_from(host, n_bytes)
                f.sync()

        def read(host=host, n_bytes=n_bytes) -> None:
            with BlockFile.open(path, write=False, direct=True) as f:
                f.read_into(host, n_bytes)

        disk_w = _timed(write, device, cfg["repeats"])
        disk_r = _timed(read, device, cfg["repeats"])
        host_write = encode_s + host_s
        disk_write = encode_s + host_s + disk_w
        rows[dtype] = {
            "stored_bytes": n_bytes, "encode_s": encode_s, "host_write_s": host_s, "disk_write_s": disk_w, "disk_read_s": disk_r,
            "disk_write_gbps": n_bytes / disk_w / 1e9, "disk_read_gbps": n_bytes / disk_r / 1e9,
            "k_star_host": math.sqrt(2 * host_write / replay_s), "k_star_disk": math.sqrt(2 * disk_write / replay_s),
        }
        os.unlink(path)
    if not cfg["disk_dir"]:
        os.rmdir(disk_dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    print(json.dumps({
        "bench": "writeback", "device": name, "torch": torch.__version__, "config": cfg, "numel": numel,
        "replay_s": replay_s, "replay_ns_per_param": replay_s / numel * 1e9, "dtypes": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }))


if __name__ == "__main__":
    main()
