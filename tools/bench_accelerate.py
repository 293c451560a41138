"""The naive disk path, for reference: two forwards through Hugging Face accelerate's disk offload.

    tools/run_capped.sh 12 runs/accel -- python tools/bench_accelerate.py --model=opt-6.7b --seq=2048 \
        --dir=/tmp/zo2tier-accel --gpu-mem=6GiB --cpu-mem=4GiB

1. A random-init checkpoint of the model's shape is saved once into ``--dir`` as sharded safetensors
   (one shard per decoder layer plus one for the rest, ``model.safetensors.index.json``, ``config.json``).
   Each tensor is drawn on the compute device and only one shard is ever in host RAM, so the whole model
   is never built on the host. An existing checkpoint of the same shape is reused.
2. The model is built with ``accelerate.init_empty_weights``, placed by
   ``infer_auto_device_map(max_memory={0: GPU, "cpu": CPU})`` (the rest goes to disk) and loaded with
   ``load_checkpoint_and_dispatch(..., offload_folder=...)``.
3. Two forwards (batch 1, ``--seq`` tokens, ``use_cache=False``) are timed. MeZO needs two forwards per
   step, so their sum is the least a MeZO step costs on this path (accelerate cannot perturb or update
   weights that live on disk at all).

Prints one JSON line: two_forward_s, forward_s (each), load_s, the placement, card, date, git_rev, command.
CPU smoke test: ``python tools/bench_accelerate.py --model=opt-125m --seq=64 --device=cpu --cpu-mem=200MB``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import SHAPES, drop_page_cache, model_config

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
INDEX = "model.safetensors.index.json"


def opt_config(name: str, dtype: torch.dtype):
    cfg = model_config(name)
    cfg.use_cache = False
    cfg.dtype = dtype
    return cfg


def git_rev() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=False).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_REV")  # no git checkout (the GPU machine's copy): pass GIT_REV=<sha>


def empty_model(config, dtype):
    import transformers as tf
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def _shard_of(name: str) -> str:
    """One shard per decoder layer, one for everything else."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return f"layer-{int(parts[i + 1]):03d}"
    return "rest"


def write_checkpoint(ckpt: str, config, dtype, device: str) -> dict:
    """Random-init safetensors shards + index + config.json; reuses a complete one of the same shape."""
    from safetensors.torch import save_file

    stamp = {"shape": [config.hidden_size, config.ffn_dim, config.num_hidden_layers,
                       config.num_attention_heads, config.vocab_size], "dtype": str(dtype)}
    index_path = os.path.join(ckpt, INDEX)
    if os.path.exists(index_path):
        with open(index_path) as fh:
            if json.load(fh).get("metadata", {}).get("zo2tier") == json.dumps(stamp):
                return {"reused": True, "write_s": 0.0}
    shutil.rmtree(ckpt, ignore_errors=True)
    os.makedirs(ckpt)
    model = empty_model(config, dtype)
    names = [(n, p.shape) for n, p in model.named_parameters()]  # de-duplicated: a tied lm_head is not listed
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    weight_map, total = {}, 0
    groups: dict[str, list] = {}
    for n, shape in names:
        groups.setdefault(_shard_of(n), []).append((n, shape))
    keys = sorted(groups)
    for k, key in enumerate(keys):
        fname = f"model-{k + 1:05d}-of-{len(keys):05d}.safetensors"
        shard = {}
        for n, shape in groups[key]:
            if n.endswith("bias"):
                t = torch.zeros(shape, dtype=dtype, device=device)
            elif "layer_norm" in n or n.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype, device=device)
            else:
                t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)
            shard[n] = t.cpu()
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        save_file(shard, os.path.join(ckpt, fname), metadata={"format": "pt"})
        del shard
    config.save_pretrained(ckpt)
    with open(index_path, "w") as fh:
        json.dump({"metadata": {"total_size": total, "zo2tier": json.dumps(stamp)}, "weight_map": weight_map}, fh)
    os.sync()
    return {"reused": False, "write_s": round(time.perf_counter() - t0, 2), "bytes": total}


def drop_caches() -> bool:
    return drop_page_cache() == "drop_caches"


def placement(device_map: dict) -> dict:
    """Decoder layers per place (GPU index, "cpu", "disk") and where the other modules went."""
    layers: dict[str, int] = {}
    other: dict[str, str] = {}
    for name, where in device_map.items():
        if ".layers." in f".{name}." and name.split(".")[-1].isdigit():
            layers[str(where)] = layers.get(str(where), 0) + 1
        else:
            other[name] = str(where)
    return {"layers": layers, "other": other}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="opt-6.7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--device", default="cuda", help="cuda (GPU 0) or cpu")
    ap.add_argument("--gpu-mem", default="6GiB", help="max_memory for GPU 0")
    ap.add_argument("--cpu-mem", default="4GiB", help='max_memory["cpu"]')
    ap.add_argument("--dir", default="/tmp/zo2tier-accel", help="checkpoint + offload folder root")
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--drop-caches", type=int, default=1,
                    help="1: drop the page cache (when permitted) after writing the checkpoint, before loading")
    ap.add_argument("--keep-offload", type=int, default=0, help="1: keep the offload folder afterwards")
    args = ap.parse_args()

    import accelerate.utils.modeling as accel_modeling
    from accelerate import infer_auto_device_map, load_checkpoint_and_dispatch

    accel_modeling.is_tqdm_available = lambda: False  # its per-tensor progress bar (disable=False) floods logs

    dtype = DTYPES[args.dtype]
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_accelerate.py: --device=cuda but CUDA is not available (use --device=cpu)")
    config = opt_config(args.model, dtype)
    ckpt = os.path.join(args.dir, f"ckpt-{args.model}-{args.dtype}")
    offload = os.path.join(args.dir, f"offload-{os.getpid()}")
    ckpt_info = write_checkpoint(ckpt, config, dtype, "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dropped = drop_caches() if args.drop_caches else False

    max_memory = {"cpu": args.cpu_mem}
    if cuda:
        max_memory = {0: args.gpu_mem, "cpu": args.cpu_mem}
    no_split = ["OPTDecoderLayer"]
    t0 = time.perf_counter()
    model = empty_model(config, dtype)
    device_map = infer_auto_device_map(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                       dtype=dtype)
    model = load_checkpoint_and_dispatch(model, ckpt, device_map=device_map, offload_folder=offload, dtype=dtype,
                                         no_split_module_classes=no_split)
    load_s = time.perf_counter() - t0

    first = 0 if cuda else "cpu"
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(first)
    times = []
    with torch.no_grad():
        for _ in range(args.forwards):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=False)
            float(out.logits[0, -1, 0])  # forces completion
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del out
    if not args.keep_offload:
        shutil.rmtree(offload, ignore_errors=True)

    record = {
        "bench": "accelerate_disk_offload",
        "card": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": git_rev(),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "model": args.model, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
        "max_memory": {str(k): v for k, v in max_memory.items()},
        "placement": placement(device_map),
        "checkpoint": ckpt_info, "caches_dropped_before_load": dropped,
        "load_s": round(load_s, 3),
        "forward_s": [round(t, 4) for t in times],
        "two_forward_s": round(sum(times[:2]), 4) if len(times) >= 2 else None,
        "min_step_tok_per_s": round(args.batch * args.seq / sum(times[:2]), 1) if len(times) >= 2 else None,
        "host_rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "gpu_peak_torch_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "accelerate": __import__("accelerate").__version__,
        "transformers": __import__("transformers").__version__,
    }
    return record


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
