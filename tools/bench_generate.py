"""Benchmark generation through the tiers on a random-init model of a real shape; one JSON line per batch size.

    python tools/bench_generate.py --model=opt-13b --tier=host --storage=fp16 --batches=1,32
    python tools/bench_generate.py --model=opt-30b --tier=disk --storage=int8 --batches=1,32 --new_tokens=4

The weights are generated straight into a zo2tier store, block by block on the GPU (never the whole model in
RAM), and the store is reused if ``--store_dir`` already holds it. Every decoder layer
is placed on ``--tier`` (host: pinned RAM; disk: read from the store's files by O_DIRECT each step), the
embeddings and head on the GPU. Each decoding step streams every layer once for the whole batch; the KV
cache stays on the GPU. Prompts are random token ids. tokens/s counts new tokens (batch x new_tokens) over
the whole ``engine.generate`` call, prefill included; ``decode_step_s`` is the mean of the steps after it.
``--delete_store=1`` removes the store at the end (the 64 GiB disk holds one of the two shapes at a time).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import resource
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _options import parse_overrides
from _shapes import model_config

DEFAULTS = {
    "model": "opt-13b",
    "tier": "host",  # host or disk: where every decoder layer lives
    "storage": "fp16",  # the layers' stored dtype: fp16, bf16 or int8
    "batches": "1,32",
    "prompt_len": 64,
    "new_tokens": 16,
    "store_dir": "/tmp/zo2tier-bench-generate",
    "budget": "device=24GiB,host=110GiB,disk=60GiB",
    "device": "cuda",
    "delete_store": 0,
    "kv_cache": "auto",  # auto, device or host (zo2tier/generate.py)
    "seed": 0,
}


def build_store(cfg: dict, device: torch.device) -> tuple[str, float]:
    """The random-init store of ``cfg["model"]`` (compute fp16, layers stored as ``cfg["storage"]``), each block
    drawn on ``device`` and written as it is made: normal(0, 0.02), norms 1, biases 0. Reused when complete.
    Returns (path, seconds)."""
    from transformers import AutoModelForCausalLM

    from zo2tier.model.loading import params_on_meta
    from zo2tier.store.blockstore import BlockStore
    from zo2tier.store.convert import block_layout
    from zo2tier.store.format import MANIFEST, Manifest, read_manifest
    from zo2tier.tiers.codec import encode, encoded_bytes

    path = os.path.join(cfg["store_dir"], f"{cfg['model']}-{cfg['storage']}")
    if os.path.exists(os.path.join(path, MANIFEST)) and read_manifest(path).complete:
        return path, 0.0
    t0 = time.perf_counter()
    config = model_config(cfg["model"])
    with params_on_meta():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    entries = block_layout(skeleton, cfg["storage"], "fp16")
    doc = {**config.to_dict(), "dtype": "float16", "architectures": [type(skeleton).__name__]}
    draft = Manifest(doc, "fp16", tuple(entries), complete=False, source={"kind": "random", "seed": cfg["seed"]})
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    with BlockStore.create(path, draft) as store:
        for entry in entries:
            flat = torch.empty(entry.numel, dtype=torch.float32, device=device)
            for t in entry.tensors:
                part = flat[t.offset : t.offset + t.numel]
                if t.name.endswith("bias"):
                    part.zero_()
                elif not t.decay:  # norm weights
                    part.fill_(1.0)
                else:
                    part.normal_(0.0, 0.02, generator=gen)
            raw = torch.empty(encoded_bytes(entry.numel, entry.dtype), dtype=torch.uint8, device=device)
            encode(flat, entry.dtype, raw, sr_seed=0, sr_key=entry.index, stochastic=False)
            store.write_block(entry.index, raw.cpu(), dtype=entry.dtype)
            del flat, raw
        store.commit(complete=True)
    return path, time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(engine, ids: torch.Tensor, new_tokens: int, kv_cache: str = "auto") -> tuple[float, float]:
    """(seconds of the whole call, mean seconds of a decoding step after the prefill)."""
    stamps = []
    forward = engine.forward

    def stamped(**kw):
        out = forward(**kw)
        sync(engine.device)
        stamps.append(time.perf_counter())
        return out

    engine.forward = stamped  # an instance attribute: only this engine, only this call
    try:
        sync(engine.device)
        t0 = time.perf_counter()
        engine.generate(ids, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, kv_cache=kv_cache)
        sync(engine.device)
        total = time.perf_counter() - t0
    finally:
        del engine.forward
    decode = [b - a for a, b in itertools.pairwise(stamps)]
    return total, sum(decode) / max(1, len(decode))


def main() -> None:
    import zo2tier

    cfg = parse_overrides(DEFAULTS)
    device = torch.device(cfg["device"])
    store, build_s = build_store(cfg, device)
    from zo2tier.model.blocks import describe
    from zo2tier.planning import planned_model

    names = describe(planned_model(store).skeleton).block_names
    engine = zo2tier.ZOEngine.from_store(store, budget=cfg["budget"], device=device,
                                         placement={n: cfg["tier"] for n in names})
    vocab = int(engine.model.config.vocab_size)
    try:
        for batch in (int(b) for b in cfg["batches"].split(",")):
            gen = torch.Generator().manual_seed(cfg["seed"] + batch)
            ids = torch.randint(3, vocab, (batch, cfg["prompt_len"]), generator=gen)
            timed_generate(engine, ids[:, :8], 2)  # warm-up: kernels, the slots, the first reads
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            total_s, step_s = timed_generate(engine, ids, cfg["new_tokens"], cfg["kv_cache"])
            counts = {t: sum(1 for v in engine.placement.values() if v == t) for t in ("device", "host", "disk")}
            print(json.dumps({
                "bench": "generate",
                "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "date": datetime.date.today().isoformat(), "torch": torch.__version__, "model": cfg["model"],
                "batch": batch, "prompt_len": cfg["prompt_len"], "new_tokens": cfg["new_tokens"],
                "placement": counts, "storage": dict(engine.storage), "compute": "fp16",
                "tokens_per_s": round(batch * cfg["new_tokens"] / total_s, 3), "seconds": round(total_s, 3),
                "decode_step_s": round(step_s, 4), "kv_cache": cfg["kv_cache"],
                "gpu_peak_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if device.type == "cuda"
                else None,
                "host_rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                "store_build_s": round(build_s, 1), "budget": cfg["budget"],
            }), flush=True)
    finally:
        engine.close()
        if cfg["delete_store"]:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
