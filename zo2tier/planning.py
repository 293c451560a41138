"""Plans from a config alone: the model skeleton is built on the meta device, so nothing is allocated.

:func:`make_plan` is the one place that turns a model's layout and the engine's settings into a placement:
``ZOEngine`` calls it, and so does ``zo2tier plan`` (through :func:`plan_for_model`), so the plan printed is
the placement the engine makes with the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from zo2tier.budget import TIERS, TierBudget, format_size
from zo2tier.model.blocks import ModelLayout, describe, scratch_spans
from zo2tier.model_ref import ModelRef, model_ref
from zo2tier.plan import (
    CUDA_CONTEXT_BYTES,
    DEFAULT_HOST_LOOKAHEAD,
    BlockSize,
    Plan,
    PlanInput,
    plan_placement,
    unplanned_device_bytes,
)
from zo2tier.predict import Calibration, choose_perturbations, predict_step
from zo2tier.store.zstd import parse_compress
from zo2tier.tiers.codec import check_storage, dtype_name
from zo2tier.tiers.write_back import resolve_write_back
from zo2tier.zo import fused
from zo2tier.zo.estimators import ESTIMATORS

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_plan_input(layout: ModelLayout, *, compute_dtype: torch.dtype, storage: Mapping[str, str],
                     lookahead_blocks: int, fused: bool, vocab_size: int, device_type: str) -> PlanInput:
    """What the planner sees of a model: the one builder the engine and ``zo2tier plan`` share.

    ``layout``: the model's blocks (``describe(model)``; a meta skeleton is enough). ``fused``: the fused CUDA
    kernel serves the blocks (``zo2tier.zo.fused.available``). ``device_type``: the compute device's
    (``"cuda"`` counts a CUDA context in the device tier; the CPU has none). Layers are bound part by part."""
    sizes = tuple(BlockSize(n, sum(p.numel for p in layout.params_under(n))) for n in layout.block_names)
    resident = sum(p.numel for p in layout.params) - sum(s.numel for s in sizes)
    part, resident_module = scratch_spans(layout)
    return PlanInput(sizes, resident, compute_dtype.itemsize, dict(storage), lookahead_blocks, fused=fused,
                     largest_part=part, largest_resident_module=resident_module, vocab_size=vocab_size,
                     context_bytes=CUDA_CONTEXT_BYTES if device_type == "cuda" else 0)


def make_plan(layout: ModelLayout, budget: TierBudget, *, placement: Mapping[str, str] | None = None,
              **plan_input: Any) -> tuple[PlanInput, Plan]:
    """(:func:`build_plan_input` of ``plan_input``, its placement under ``budget``): what the engine runs and
    ``zo2tier plan`` prints. ``placement`` overrides the placement (checked against the budget)."""
    inp = build_plan_input(layout, **plan_input)
    return inp, plan_placement(inp, budget, dict(placement) if placement is not None else None)


@dataclass(frozen=True)
class PlannedModel:
    """A model as the engine would open it, seen without its weights."""

    ref: ModelRef
    skeleton: Any  # the model on the meta device
    compute_dtype: torch.dtype
    storage: dict[str, str]  # stored dtype per tier
    compress: bool  # a store converted with --compress zstd


def planned_model(model: str, *, storage: Mapping[str, str] | None = None, dtype: str | None = None) -> PlannedModel:
    """Open ``model`` (store, Hugging Face folder, GGUF or config.json) as ``ZOEngine.from_pretrained`` would:
    the same compute dtype and default storage, on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zo2tier.checkpoint import skeleton_from_config

    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; use fp32, fp16 or bf16")
    ref = model_ref(model)
    given = _DTYPES[dtype] if dtype else None
    layer_default, compress = {}, False
    if ref.kind == "store":
        from zo2tier.store.format import read_manifest

        m = read_manifest(ref.path)
        compute = given or _DTYPES[m.dtype]
        skeleton = skeleton_from_config(m.config, compute)
        layer_dtypes = {b.dtype for b in m.blocks[:-1]}
        if len(layer_dtypes) == 1:  # as zo2tier.checkpoint builds an engine on a store
            layer_default = {"disk": layer_dtypes.pop()}
        compress = bool(m.blocks[:-1]) and all(b.zstd for b in m.blocks[:-1])
    elif ref.kind == "gguf":
        compute = given or torch.float32
        skeleton = skeleton_from_config(ref.config_dict(), compute)
    else:
        config = AutoConfig.from_pretrained(ref.path)
        compute = given or _config_dtype(ref.config_dict())
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=compute)
    chosen = dict(storage) if storage else layer_default
    unknown = set(chosen) - set(TIERS)
    if unknown:
        raise ValueError(f"storage names unknown tier(s) {sorted(unknown)}; use device, host, disk")
    tiers = {t: check_storage(chosen.get(t, dtype_name(compute))) for t in TIERS}
    return PlannedModel(ref, skeleton, compute, tiers, compress)


def plan_for_model(model: str, budget: TierBudget, *, device: str = "cpu", storage=None,
                   dtype: str | None = None) -> tuple[Plan, PlanInput, PlannedModel]:
    """The placement ``ZOEngine.from_pretrained(model, budget=..., device=device, storage=..., dtype=...)``
    makes, computed from the config alone."""
    pm = planned_model(model, storage=storage, dtype=dtype)
    dev = check_device(device)
    # the GPU machine has Triton; planning for it from a machine without CUDA assumes the fused path too
    uses_fused = fused.available(dev, pm.compute_dtype) or (dev.type == "cuda" and not torch.cuda.is_available())
    inp, plan = make_plan(describe(pm.skeleton), budget, compute_dtype=pm.compute_dtype, storage=pm.storage,
                          lookahead_blocks=DEFAULT_HOST_LOOKAHEAD, fused=uses_fused,
                          vocab_size=int(getattr(pm.skeleton.config, "vocab_size", 0) or 0), device_type=dev.type)
    return plan, inp, pm


def plan_from_config(
    model: str, budget: TierBudget, *, storage: dict[str, str] | None = None, dtype: str | None = None,
    device: str = "cpu",
) -> tuple[Plan, PlanInput]:
    """(placement, plan input) for ``model`` (store, folder, GGUF or config.json) under ``budget``."""
    plan, inp, _ = plan_for_model(model, budget, device=device, storage=storage, dtype=dtype)
    return plan, inp


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; ValueError naming the value and the fix when it cannot be used here
    for a run (``cuda`` with a CPU-only torch is fine for planning: see :func:`plan_for_model`)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is unknown; use cpu, cuda or cuda:N") from None


def _config_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return getattr(torch, name, torch.float32) if name in ("float32", "float16", "bfloat16") else torch.float32


def describe_plan(model: str, budget: TierBudget, *, storage=None, dtype=None, calibration=None,
                  batch: int = 1, seq: int = 2048, write_back_every: int | None = None, compress=None,
                  device: str = "cpu", estimator: str = "mezo", perturbations: int | str | None = None) -> str:
    """The text ``zo2tier plan`` prints: the placement, and the predicted step time and its bound.

    ``compress``: zstd on the disk tier (anything ``zo2tier.store.zstd.parse_compress`` takes; default: as the
    engine, on for a store converted with zstd). ``write_back_every``: K (default: the engine's for ``device``).
    ``estimator``/``perturbations``: the step's estimator and q (``"auto"``: the q the engine would choose;
    None: the estimator's ``default_perturbations``).
    """
    plan, inp, pm = plan_for_model(model, budget, device=device, storage=storage, dtype=dtype)
    zstd = parse_compress(compress) is not None if compress is not None else pm.compress
    ks = resolve_write_back(write_back_every, check_device(device), inp.storage)
    k = ks["disk"] if plan.counts()["disk"] else ks["host"]
    n_params = inp.resident_numel + sum(b.numel for b in inp.blocks)
    compute = dtype_name(pm.compute_dtype)
    why = "" if dtype else " (the model's dtype, fp32 if it names none; --dtype to choose)"
    head = (f"{model} ({pm.ref.kind}): {_count(n_params)} parameters, {len(inp.blocks)} blocks, compute "
            f"{compute}{why}, device {device}, storage {inp.storage}"
            + (", disk tier zstd-compressed" if zstd else ""))
    cal = Calibration.load(calibration)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is unknown; use one of {', '.join(sorted(ESTIMATORS))}")
    if perturbations is None:
        perturbations = ESTIMATORS[estimator].default_perturbations
    if perturbations == "auto":
        choice = choose_perturbations(inp, plan, cal, batch=batch, seq=seq, estimator=estimator,
                                      write_back_every=k, compress=zstd)
        q = choice.n_perturbations
        chosen = (f"\nperturbations: auto chose q={q} for {estimator} (stopped by {choice.limit}; "
                  f"activations of {ESTIMATORS[estimator].n_copies(q)} batch copies counted)")
    else:
        q, chosen = int(perturbations), f"\nperturbations: q={perturbations} for {estimator}"
    if check_device(device).type == "cpu" and calibration is None:  # the default rates are a GPU machine's
        tail = ("predicted step: none for --device cpu without --calibration (the default rates are an H100's; "
                "tools/bench_io.py --calibration-out measures a machine); --device cuda predicts a GPU run" + chosen)
    else:
        pred = predict_step(inp, plan, cal, tokens=batch * seq, write_back_every=k, compress=zstd,
                            estimator=estimator, n_perturbations=q)
        codec = (f", zstd {pred.zstd_s:.3f} s at ratio {getattr(cal, 'zstd_ratio_' + inp.storage['disk']):.3f}"
                 + (" (zstd GB/s of the GPU machine's 16 cores, benchmarks/zstd_h100.json)" if calibration is None
                    else "") if zstd else "")
        tail = (f"predicted step ({batch}x{seq} tokens, write-back every host {ks['host']} / disk {ks['disk']} "
                f"steps): {pred.step_s:.3f} s = {batch * seq / pred.step_s:,.0f} tok/s, bound by {pred.bound} "
                f"(compute {pred.compute_s:.3f} s, bus {pred.bus_s:.3f} s, disk {pred.disk_s:.3f} s{codec}; "
                f"rates from {calibration or 'docs/design.md defaults (H100 machine)'})" + chosen)
    extra = unplanned_device_bytes(inp, batch * seq)
    where, besides = (("GPU", "CUDA context, logits, loss and activations") if inp.context_bytes
                      else ("device-tier (CPU)", "logits, loss and activations"))
    peak = (f"estimated {where} peak ({batch}x{seq} tokens): {format_size(plan.used_bytes['device'] + extra)} "
            f"= device {format_size(plan.used_bytes['device'])} + {besides} {format_size(extra)} "
            f"(measured on an H100; docs/scaling.md)"
            + ("" if inp.context_bytes else "; --device cuda plans for a GPU, with its CUDA context"))
    return "\n".join([head, plan.table(), placement_line(plan, [b.name for b in inp.blocks]), peak, tail])


def _count(n: int) -> str:
    """A parameter count as people say it: 1.24B, 135M, 73.5K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if float(f"{n / size:.3g}") >= 1:  # rounded first: 999,999 is 1M, not 1000K
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)


def placement_line(plan: Plan, names: list[str]) -> str:
    """``placement: device 0-1, host 2-3, disk 4-29`` (block indices in execution order, runs per tier)."""
    runs: list[list] = []
    for i, name in enumerate(names):
        tier = plan.placement[name]
        if runs and runs[-1][0] == tier and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([tier, i, i])
    parts = [f"{t} {a}" if a == b else f"{t} {a}-{b}" for t, a, b in runs]
    return "placement: " + (", ".join(parts) if parts else "no movable blocks")
