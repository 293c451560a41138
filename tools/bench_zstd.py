"""zstd on stored weight blocks: compression ratio and compress / decompress GB/s by thread count.

Blocks have the shape of one OPT-6.7B decoder layer (hidden 4096, ffn 16384: 4 * 4096**2 attention +
2 * 4096 * 16384 MLP = 201M parameters), random-normal * 0.02, encoded as bf16, fp16 and int8 (zo2tier's
codec: group-wise absmax scales). GB/s counts uncompressed bytes. Decompression of one zstd frame is
single-threaded in zstd, so the block is cut into ``threads`` independent frames, decompressed in parallel
threads (the python binding releases the GIL); compression uses zstd's own workers
(``ZstdCompressor(threads=N)``). One JSON line on stdout.

    python tools/bench_zstd.py --threads=1,2,4,8,16 --level=1
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _options import parse_overrides  # noqa: E402
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zstandard

from zo2tier.tiers.codec import encode, encoded_bytes

HIDDEN = 4096
FFN = 16384
SCALE_NUMEL = 1.0  # fraction of the layer to use (e.g. 0.25 on a small machine)
DTYPES = "bf16,fp16,int8"
THREADS = "1,2,4,8,16"
LEVEL = 1
REPEATS = 2


def _args() -> dict:
    cfg = dict(hidden=HIDDEN, ffn=FFN, scale_numel=SCALE_NUMEL, dtypes=DTYPES, threads=THREADS, level=LEVEL,
               repeats=REPEATS)
    return parse_overrides(cfg)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _frames(data: bytes, n: int) -> list[memoryview]:
    step = -(-len(data) // n)
    view = memoryview(data)
    return [view[i : i + step] for i in range(0, len(data), step)]


def main() -> None:
    cfg = _args()
    numel = int((4 * cfg["hidden"] ** 2 + 2 * cfg["hidden"] * cfg["ffn"]) * cfg["scale_numel"])
    weights = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02
    threads = [int(t) for t in cfg["threads"].split(",")]
    rows = {}
    for dtype in cfg["dtypes"].split(","):
        raw = torch.empty(encoded_bytes(numel, dtype), dtype=torch.uint8)
        encode(weights, dtype, raw, sr_seed=0, sr_key=0, stochastic=False)
        data = raw.numpy().tobytes()
        per_threads = {}
        for n in threads:
            comp = zstandard.ZstdCompressor(level=cfg["level"], threads=n if n > 1 else 0)
            blob = comp.compress(data)  # one frame, zstd's worker threads
            comp_s = _best(lambda: comp.compress(data), cfg["repeats"])
            parts = [zstandard.ZstdCompressor(level=cfg["level"]).compress(p) for p in _frames(data, n)]
            with ThreadPoolExecutor(n) as pool:
                def decompress() -> None:
                    list(pool.map(lambda p: zstandard.ZstdDecompressor().decompress(p), parts))

                dec_s = _best(decompress, cfg["repeats"])
            per_threads[n] = dict(ratio=len(blob) / len(data), ratio_framed=sum(map(len, parts)) / len(data),
                                  compress_gbps=len(data) / comp_s / 1e9, decompress_gbps=len(data) / dec_s / 1e9)
        rows[dtype] = dict(stored_bytes=len(data), threads=per_threads)
    print(json.dumps(dict(bench="zstd", cpus=os.cpu_count(), zstandard=zstandard.__version__, torch=torch.__version__,
                          config=cfg, numel=numel, dtypes=rows, time=time.strftime("%Y-%m-%dT%H:%M:%S"))))


if __name__ == "__main__":
    main()
