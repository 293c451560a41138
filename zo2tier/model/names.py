"""Which checkpoint tensor holds each parameter of a model: the name resolver of the Hugging Face
checkpoint loaders (``zo2tier convert`` and ``ZOEngine.from_pretrained`` of a folder; a GGUF's tensors carry
the model's own names, and a store those its convert resolved).

A parameter ``name`` of ``model.named_parameters()`` is found in a checkpoint's keys under

- itself or another name of the same tied tensor (a tied weight is saved once);
- with or without the base-model prefix (``model.``, ``gpt_neox.``...);
- the legacy name transformers renames on load (``get_model_conversion_mapping``: GPT-NeoX saves its head as
  ``embed_out``, Mixtral its MoE as ``block_sparse_moe``).

Checkpoint tensors that transformers *merges* on load (Mixtral's per-expert ``w1``/``w3`` into one
``gate_up_proj``) are refused when the resolver is bound, with a one-line reason: zo2tier reads one checkpoint
tensor per parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from torch import nn

from zo2tier.model.blocks import UnsupportedModelError

Resolve = Callable[[str], str]


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter name -> every name of its tensor (one entry per name of a tied tensor)."""
    by_tensor: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(n)
    return {n: names for names in by_tensor.values() for n in names}


def _conversions(model: nn.Module, keys: Collection[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(renamed key -> checkpoint key, merged parameter -> its checkpoint keys) under transformers' load-time
    conversions of ``model``; empty for a model without any (or a transformers without the API)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {}, {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamed: dict[str, str] = {}
    merged: dict[str, list[str]] = {}
    # in transformers' own order (its loader sorts keys naturally; stateful renamings depend on it). An exact
    # key still wins over a renamed one in resolve(): they differ only for chained renamings, which no
    # causal LM uses today
    for key in sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")]):
        new, converter = rename_source_key(key, renamings, converters)
        if converter is not None:
            merged.setdefault(new, []).append(key)
        elif new != key:
            if new in renamed:
                raise ValueError(f"checkpoint keys {renamed[new]!r} and {key!r} both rename to {new!r}; "
                                 "which one holds it is ambiguous")
            renamed[new] = key
    return renamed, merged


def name_resolver(model: nn.Module) -> Callable[[Collection[str]], Resolve]:
    """``bind(keys)`` -> ``resolve(name)``: the key in ``keys`` that holds parameter ``name`` of ``model`` (a
    meta skeleton is enough). ``bind`` checks every parameter up front: a merged one raises
    :class:`UnsupportedModelError`, a missing one ``ValueError`` naming it and the names tried."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = tied_names(model)
    names = list(tied)

    def bind(keys: Collection[str]) -> Resolve:
        renamed, merged = _conversions(model, keys)

        def candidates(name: str) -> list[str]:
            out = []
            for n in tied.get(name, [name]):
                out.append(n)
                if prefix and n.startswith(prefix + "."):
                    out.append(n[len(prefix) + 1 :])
                elif prefix:
                    out.append(f"{prefix}.{n}")
            return out

        def resolve(name: str) -> str:
            tried = candidates(name)
            for c in tried:
                if c in keys:
                    return c
            for c in tried:
                if c in renamed:
                    return renamed[c]
            raise ValueError(f"the checkpoint has no tensor for parameter {name!r} of {type(model).__name__} "
                             f"(tried {tried}); is it a checkpoint of this model's config?")

        for name in names:
            parts = next((merged[c] for c in candidates(name) if c in merged), None)
            if parts is not None:
                saved = (f"is saved as {len(parts)} tensors ({parts[0]!r}, ...) that transformers merges when it "
                         "loads them" if len(parts) > 1 else
                         f"is saved as {parts[0]!r}, which transformers converts when it loads it")
                raise UnsupportedModelError(
                    f"{type(model).__name__}: parameter {name!r} {saved}; zo2tier reads one "
                    "checkpoint tensor per parameter as it is and cannot convert them yet")
        for name in names:
            resolve(name)
        return resolve

    return bind
