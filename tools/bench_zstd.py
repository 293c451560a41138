"""zstd on stored weight blocks, exactly as the engine's disk tier does it: ratio and GB/s by thread count.

Blocks have the shape of one OPT-6.7B decoder layer (hidden 4096, ffn 16384: 4 * 4096**2 attention +
2 * 4096 * 16384 MLP = 201M parameters), random-normal * 0.02, encoded by zo2tier's codec as fp32, bf16,
fp16 and int8 (group-wise absmax scales). Each block is written and read through
``zo2tier.store.zstd.FramePool`` with ``Zstd(level, frame_bytes)``: the block cut into independent frames
of ``frame_bytes`` (default: the engine's ``ZSTD_FRAME_BYTES``), each compressed, padded to 4 KiB and
written at its slot, then read back, checksummed and decompressed straight into a 4 KiB-aligned staging
buffer (pinned when CUDA is there), by a pool of ``threads`` threads. GB/s counts uncompressed bytes.

The file lives in ``--dir`` (default ``/dev/shm``: memory, so the numbers are zstd's, not the disk's; a
directory on the NVMe gives the disk path end to end, page cache included). One JSON line on stdout;
``--calibration_out=PATH`` also writes the ``zstd_*`` keys ``zo2tier plan --calibration`` reads (GB/s at the
largest thread count, for ``--calibration_dtype``).

    python tools/bench_zstd.py --threads=1,2,4,8,16
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import time

import torch
import zstandard
from _options import parse_overrides

from zo2tier.store.io import BlockFile, aligned_empty
from zo2tier.store.zstd import ZSTD_FRAME_BYTES, ZSTD_LEVEL, FramePool, Zstd
from zo2tier.tiers.codec import encode, encoded_bytes

HIDDEN = 4096
FFN = 16384
SCALE_NUMEL = 1.0  # fraction of the layer to use (e.g. 0.25 on a small machine)
DTYPES = "fp32,bf16,fp16,int8"
THREADS = "1,2,4,8,16"
LEVEL = ZSTD_LEVEL
FRAME_BYTES = ZSTD_FRAME_BYTES
REPEATS = 2
DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
DIRECT = 0  # 1: O_DIRECT, as the engine opens disk-tier files (pointless on /dev/shm)
CALIBRATION_OUT = ""
CALIBRATION_DTYPE = "bf16"


def _args() -> dict:
    cfg = {"hidden": HIDDEN, "ffn": FFN, "scale_numel": SCALE_NUMEL, "dtypes": DTYPES, "threads": THREADS, "level": LEVEL,
           "frame_bytes": FRAME_BYTES, "repeats": REPEATS, "dir": DIR, "direct": DIRECT, "calibration_out": CALIBRATION_OUT,
           "calibration_dtype": CALIBRATION_DTYPE}
    return parse_overrides(cfg)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _one_dtype(weights: torch.Tensor, dtype: str, threads: list[int], cfg: dict) -> dict:
    numel = weights.numel()
    raw = aligned_empty(encoded_bytes(numel, dtype))
    encode(weights, dtype, raw, sr_seed=0, sr_key=0, stochastic=False)
    n_bytes = encoded_bytes(numel, dtype)
    src = memoryview(raw.numpy())[:n_bytes]
    staging = aligned_empty(n_bytes, pin=torch.cuda.is_available())
    spec = Zstd(cfg["level"], cfg["frame_bytes"])
    path = os.path.join(cfg["dir"], f"zo2tier-bench-zstd-{os.getpid()}.bin")
    per_threads = {}
    try:
        for n in threads:
            with FramePool(n) as pool:
                def write():
                    with BlockFile.open(path, write=True, direct=bool(cfg["direct"])) as f:
                        os.ftruncate(f._fd, 0)  # a new file each time, as a write-back's new generation
                        return pool.write(f, src, spec)

                def read(layout):
                    with BlockFile.open(path, write=False, direct=bool(cfg["direct"])) as f:
                        pool.read(f, layout, memoryview(staging.numpy())[:n_bytes])

                comp_s, layout = _best(write, cfg["repeats"])
                dec_s, _ = _best(lambda: read(layout), cfg["repeats"])  # noqa: B023 - called right here
                if not torch.equal(staging[:n_bytes], raw[:n_bytes]):
                    raise SystemExit(f"{dtype}: the block read back differs from the one written")
            per_threads[n] = {"compress_gbps": n_bytes / comp_s / 1e9, "decompress_gbps": n_bytes / dec_s / 1e9}
    finally:
        if os.path.exists(path):
            os.unlink(path)
    one_frame = len(zstandard.ZstdCompressor(level=cfg["level"]).compress(src))
    return {"stored_bytes": n_bytes, "n_frames": len(layout.frames), "ratio": layout.stored_bytes / n_bytes,
            "ratio_file": layout.extent_bytes / n_bytes, "ratio_one_frame": one_frame / n_bytes, "threads": per_threads}


def main() -> None:
    cfg = _args()
    numel = int((4 * cfg["hidden"] ** 2 + 2 * cfg["hidden"] * cfg["ffn"]) * cfg["scale_numel"])
    weights = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02
    threads = [int(t) for t in cfg["threads"].split(",")]
    rows = {dtype: _one_dtype(weights, dtype, threads, cfg) for dtype in cfg["dtypes"].split(",")}
    print(json.dumps({"bench": "zstd", "cpus": os.cpu_count(), "zstandard": zstandard.__version__, "torch": torch.__version__,
                      "config": cfg, "numel": numel, "dtypes": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    if cfg["calibration_out"]:
        top = rows[cfg["calibration_dtype"]]["threads"][max(threads)]
        calibration = {f"zstd_ratio_{d}": r["ratio"] for d, r in rows.items()}
        calibration.update(zstd_decompress_gbps=top["decompress_gbps"], zstd_compress_gbps=top["compress_gbps"])
        with open(cfg["calibration_out"], "w", encoding="utf-8") as f:
            json.dump(calibration, f, indent=1)


if __name__ == "__main__":
    main()
