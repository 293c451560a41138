"""Plans from a config alone: the model skeleton is built on the meta device, so nothing is allocated."""

from __future__ import annotations

import os

import torch

from zo2tier.budget import TierBudget, format_size
from zo2tier.model.blocks import describe, scratch_spans
from zo2tier.plan import DEFAULT_HOST_LOOKAHEAD, BlockSize, Plan, PlanInput, plan_placement, unplanned_device_bytes
from zo2tier.predict import Calibration, predict_step
from zo2tier.store.zstd import parse_compress
from zo2tier.tiers.codec import check_storage

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def plan_from_config(
    model: str, budget: TierBudget, *, storage: dict[str, str] | None = None, dtype: str | None = None
) -> tuple[Plan, PlanInput]:
    """Placement for the model at ``model`` (directory or config.json) under ``budget``, with the device
    buffers the engine allocates by default."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.exists(model):
        raise FileNotFoundError(f"{model!r} does not exist; give a model directory or a config.json")
    config = AutoConfig.from_pretrained(model)  # a directory or a config.json file
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; use fp32, fp16 or bf16")
    torch_dtype = _DTYPES[dtype] if dtype else (getattr(config, "dtype", None) or torch.float32)
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    layout = describe(skeleton)
    default = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[torch_dtype]
    tiers = {t: check_storage((storage or {}).get(t, default)) for t in ("device", "host", "disk")}
    sizes = tuple(BlockSize(n, sum(p.numel for p in layout.params_under(n))) for n in layout.block_names)
    resident = sum(p.numel for p in layout.params) - sum(s.numel for s in sizes)
    part, resident_module = scratch_spans(layout)
    inp = PlanInput(sizes, resident, torch_dtype.itemsize, tiers, DEFAULT_HOST_LOOKAHEAD,
                    largest_part=part, largest_resident_module=resident_module,
                    vocab_size=int(getattr(config, "vocab_size", 0) or 0))
    return plan_placement(inp, budget), inp


def describe_plan(model: str, budget: TierBudget, *, storage=None, dtype=None, calibration=None,
                  batch: int = 1, seq: int = 2048, write_back_every: int = 1, compress=None) -> str:
    """The text ``zo2tier plan`` prints: the placement, and the predicted step time and its bound.

    ``compress``: zstd on the disk tier (anything ``zo2tier.store.zstd.parse_compress`` takes).
    """
    zstd = parse_compress(compress) is not None
    plan, inp = plan_from_config(model, budget, storage=storage, dtype=dtype)
    n_params = inp.resident_numel + sum(b.numel for b in inp.blocks)
    compute = {4: "fp32", 2: "fp16/bf16"}.get(inp.compute_bytes, f"{inp.compute_bytes} bytes")
    why = "" if dtype else " (the config's dtype, fp32 if it names none; --dtype to choose)"
    head = (f"{model}: {n_params / 1e9:.2f}B parameters, {len(inp.blocks)} blocks, compute {compute}{why}, "
            f"storage {inp.storage}" + (", disk tier zstd-compressed" if zstd else ""))
    cal = Calibration.load(calibration)
    pred = predict_step(inp, plan, cal, tokens=batch * seq, write_back_every=write_back_every, compress=zstd)
    codec = (f", zstd {pred.zstd_s:.3f} s at ratio {getattr(cal, 'zstd_ratio_' + inp.storage['disk']):.3f}"
             + (" (zstd GB/s of the GPU machine's 16 cores, benchmarks/zstd_h100.json)" if calibration is None
                else "") if zstd else "")
    tail = (f"predicted step ({batch}x{seq} tokens, write-back every {write_back_every}): {pred.step_s:.3f} s "
            f"= {batch * seq / pred.step_s:,.0f} tok/s, bound by {pred.bound} "
            f"(compute {pred.compute_s:.3f} s, bus {pred.bus_s:.3f} s, disk {pred.disk_s:.3f} s{codec}; "
            f"rates from {calibration or 'DESIGN.md defaults (H100 machine)'})")
    extra = unplanned_device_bytes(inp, batch * seq)
    peak = (f"estimated GPU peak ({batch}x{seq} tokens): {format_size(plan.used_bytes['device'] + extra)} = "
            f"device {format_size(plan.used_bytes['device'])} + CUDA context, logits, loss and activations "
            f"{format_size(extra)} (measured on an H100; docs/scaling.md)")
    return head + "\n" + plan.table() + "\n" + peak + "\n" + tail
