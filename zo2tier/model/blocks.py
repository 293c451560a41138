"""Find the movable blocks (decoder layers) and the resident set of any Hugging Face decoder model.

No per-family code: the layer list is the one ``nn.ModuleList`` whose children are instances of the
classes named in ``model._no_split_modules``; ``model.get_decoder()`` is the fallback. Everything
outside that list that directly owns parameters (embeddings, final norm, LM head, GPT-2's ``wpe``,
OPT's ``project_in``/``project_out``) forms the resident set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model cannot be wrapped; the message names its class and why."""


@dataclass(frozen=True)
class ParamSpec:
    """One unique parameter: its stable id (the position in de-duplicated ``named_parameters()``)."""

    param_id: int
    name: str  # canonical full name in model.named_parameters()
    shape: tuple[int, ...]
    dtype: torch.dtype
    decay: bool  # MeZO applies no weight decay to biases and norm weights

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ModelLayout:
    """Where everything is: the layer list, the resident modules, and every parameter's id."""

    layers_name: str  # e.g. "model.layers"
    block_names: tuple[str, ...]  # e.g. ("model.layers.0", ...), in execution order
    resident_names: tuple[str, ...]  # modules outside the layer list that own parameters directly
    params: tuple[ParamSpec, ...]  # every unique parameter, indexed by param_id
    aliases: dict[str, str]  # tied name -> canonical name (e.g. "lm_head.weight" -> "model.embed_tokens.weight")
    # each block's parts: the modules the engine runs one at a time, each with its own θ±εz (see block_parts)
    parts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def params_under(self, prefix: str) -> list[ParamSpec]:
        """Unique parameters whose canonical name lies under module ``prefix``."""
        dot = prefix + "."
        return [p for p in self.params if p.name.startswith(dot)]


def _is_no_decay(name: str, owner: nn.Module) -> bool:
    """Biases and the weights of norm layers (LayerNorm, RMSNorm, ...) get no weight decay."""
    return name.endswith("bias") or "norm" in type(owner).__name__.lower()


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the decoder layers, or raise UnsupportedModelError."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates: list[tuple[str, nn.ModuleList]] = []
    if no_split:
        for name, module in model.named_modules():
            if (isinstance(module, nn.ModuleList) and len(module) > 0
                    and all(type(child).__name__ in no_split for child in module)):
                candidates.append((name, module))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = [n for n, _ in candidates]
        raise UnsupportedModelError(
            f"{type(model).__name__} has several layer lists {names} matching _no_split_modules; "
            "zo2tier wraps decoder-only causal LMs with exactly one"
        )
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        lists = [
            (n, m) for n, m in decoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
        ]
        if len(lists) == 1:
            prefix = next(n for n, m in model.named_modules() if m is decoder)
            name = f"{prefix}.{lists[0][0]}" if prefix else lists[0][0]
            return name, lists[0][1]
    raise UnsupportedModelError(
        f"{type(model).__name__} has no single decoder layer list: no nn.ModuleList of the classes in "
        f"_no_split_modules={sorted(no_split)} and get_decoder() gave none; zo2tier supports decoder-only "
        "causal LMs (OPT, Llama, Qwen, Mistral, GPT-2, Gemma, ...)"
    )


def describe(model: nn.Module) -> ModelLayout:
    """Inspect ``model`` once and return its :class:`ModelLayout`."""
    if not hasattr(model, "config") or not callable(getattr(model, "forward", None)):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; pass an AutoModelForCausalLM"
        )
    layers_name, layers = find_layer_list(model)
    block_names = tuple(f"{layers_name}.{i}" for i in range(len(layers)))

    modules = dict(model.named_modules())
    params: list[ParamSpec] = []
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in canonical:
            aliases[name] = canonical[key]
            continue
        canonical[key] = name
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        params.append(
            ParamSpec(len(params), name, tuple(p.shape), p.dtype, decay=not _is_no_decay(name, owner))
        )

    layer_prefix = layers_name + "."
    resident: list[str] = []
    for name, module in model.named_modules():
        if name == layers_name or name.startswith(layer_prefix):
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if any(name.startswith(r + ".") for r in resident) or (name == "" and resident):
            continue
        if layers_name.startswith(name + ".") or name == "":
            raise UnsupportedModelError(
                f"{type(model).__name__}: module {name or '<root>'!r} owns parameters and also contains the "
                "layer list; zo2tier cannot keep it resident without wrapping the layers twice"
            )
        resident.append(name)
    by_name = {p.name: p for p in params}
    parts = {name: block_parts(modules[name], name, by_name) for name in block_names}
    return ModelLayout(layers_name, block_names, tuple(resident), tuple(params), aliases, parts)


def block_parts(layer: nn.Module, prefix: str, params_by_name: dict[str, ParamSpec]) -> tuple[str, ...]:
    """The parts of decoder layer ``prefix``: its direct children that hold parameters (attention, MLP or
    its projections, norms), in declaration order, or ``(prefix,)`` when the layer cannot be split.

    The engine builds θ±εz one part at a time, so its scratch is as large as the largest part, not the
    layer (OPT-13B: 105M instead of 315M parameters). A layer is split only when the layer itself owns no
    parameter, no parameter is shared between two children, and each child's parameters are contiguous in
    the layer's parameter order (they are in any module tree). Each part must then be called at most once
    per forward; the engine copes with a part called twice or never, at the cost of another fetch.
    """
    if any(True for _ in layer.parameters(recurse=False)):
        return (prefix,)
    order = [n for n, _ in layer.named_parameters(remove_duplicate=False)]
    owner: dict[int, str] = {}
    parts: list[str] = []
    for child_name, child in layer.named_children():
        weights = [p for _, p in child.named_parameters(remove_duplicate=False)]
        if not weights:
            continue
        for p in weights:
            if owner.setdefault(id(p), child_name) != child_name:
                return (prefix,)  # a weight tied across children: run the layer whole
        parts.append(child_name)
    flat = [f"{prefix}.{n}" for n in order if f"{prefix}.{n}" in params_by_name]  # canonical, de-duplicated
    seen: list[str] = []
    for name in flat:
        part = name[len(prefix) + 1 :].split(".", 1)[0]
        if seen and seen[-1] != part and part in seen:
            return (prefix,)  # a child's parameters are not contiguous
        if not seen or seen[-1] != part:
            seen.append(part)
    if len(parts) < 2:
        return (prefix,)
    return tuple(f"{prefix}.{c}" for c in parts)


def scratch_spans(layout: ModelLayout, split: bool = True) -> tuple[int, int]:
    """(largest block part, largest resident module) in parameters: what the engine's θ±εz scratch holds.
    ``split=False``: whole layers. A tied weight counts in each module that uses it (OPT's LM head)."""
    numel = {p.name: p.numel for p in layout.params}
    part = 0
    for block in layout.block_names:
        for name in layout.parts.get(block, (block,)) if split else (block,):
            part = max(part, sum(p.numel for p in layout.params_under(name)))
    resident = 0
    for name in layout.resident_names:
        own = sum(p.numel for p in layout.params_under(name))
        tied = sum(numel[c] for a, c in layout.aliases.items() if a.startswith(name + ".") and c in numel)
        resident = max(resident, own + tied)
    return part, resident
