"""Which checkpoint tensor holds each parameter of a model: the name resolver of the Hugging Face
checkpoint loaders (``zo2tier convert`` and ``ZOEngine.from_pretrained`` of a folder; a GGUF's tensors carry
the model's own names, and a store those its convert resolved).

A parameter ``name`` of ``model.named_parameters()`` is found in a checkpoint's keys under

- itself or another name of the same tied tensor (a tied weight is saved once);
- with or without the base-model prefix (``model.``, ``gpt_neox.``...);
- the legacy name transformers renames on load (``get_model_conversion_mapping``: GPT-NeoX saves its head as
  ``embed_out``, Mixtral its MoE as ``block_sparse_moe``).

Checkpoint tensors that transformers *merges* on load (Mixtral's, Qwen-MoE's, OLMoE's per-expert
``w1``/``w3`` into one ``gate_up_proj``) are merged here by transformers' own converter of that model
(``resolve.tensor(name, read)``): the parameter is built from its checkpoint tensors, one parameter at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection

import torch
from torch import nn

from zo2tier.model.blocks import UnsupportedModelError


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter name -> every name of its tensor (one entry per name of a tied tensor)."""
    by_tensor: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(n)
    return {n: names for names in by_tensor.values() for n in names}


class Merge:
    """A parameter that transformers builds from several checkpoint tensors (or converts from one): ``keys``
    are those tensors in transformers' load order; :meth:`build` runs the model's own converter on them.
    One converter may give several parameters (``targets``); a build returns all of them."""

    def __init__(self, converter, parts: list[tuple[str, str]], targets: list[str]) -> None:
        self._converter, self._parts, self.targets = converter, parts, targets
        self.keys = [key for key, _ in parts]

    def build(self, read: Callable[[str], torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Every target of this merge from ``read(key)`` (whole checkpoint tensors)."""
        converter = copy.deepcopy(self._converter)  # it collects the tensors it is given
        for key, pattern in self._parts:
            converter.add_tensor(self.targets[0], key, pattern, lambda key=key: read(key))
        out = converter.convert(self.targets[0], model=model, config=getattr(model, "config", None))
        built = {name: value[0] if isinstance(value, list) else value for name, value in out.items()}
        missing = set(self.targets) - set(built)
        if missing:
            raise UnsupportedModelError(f"{type(model).__name__}: transformers' converter for {self.keys[0]!r} did "
                                        f"not give {sorted(missing)}; zo2tier cannot load this checkpoint")
        return built


def _conversions(model: nn.Module, keys: Collection[str]) -> tuple[dict[str, str], dict[str, Merge]]:
    """(renamed key -> checkpoint key, merged parameter -> its :class:`Merge`) under transformers' load-time
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
    parts: dict[str, tuple[object, list[tuple[str, str]]]] = {}
    # in transformers' own order (its loader sorts keys naturally: expert 10 after expert 9, and a merge stacks
    # them in that order; stateful renamings depend on it too). An exact key still wins over a renamed one in
    # resolve(): they differ only for chained renamings, which no causal LM uses today
    for key in sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")]):
        new, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:
            converter = next(c for c in converters if pattern in c.source_patterns)
            parts.setdefault(new, (converter, []))[1].append((key, pattern))
        elif new != key:
            if new in renamed:
                raise ValueError(f"checkpoint keys {renamed[new]!r} and {key!r} both rename to {new!r}; "
                                 "which one holds it is ambiguous")
            renamed[new] = key
    merged: dict[str, Merge] = {}
    for new, (converter, group) in parts.items():
        first = converter.target_patterns[0]
        targets = [new.replace(first, t, 1) for t in converter.target_patterns] if first in new else [new]
        merge = Merge(converter, group, targets)
        merged.update(dict.fromkeys(targets, merge))
    return renamed, merged


class Resolver:
    """``resolve(name)``: the checkpoint key holding parameter ``name``; ``resolve.merge(name)``: the
    :class:`Merge` that builds it instead, or None; ``resolve.tensor(name, read)``: the parameter either way."""

    def __init__(self, model: nn.Module, keys: Collection[str]) -> None:
        self._model = model
        self._prefix = getattr(model, "base_model_prefix", "") or ""
        self._tied = tied_names(model)
        self._keys = keys
        self._renamed, merged = _conversions(model, keys)
        self._merged: dict[str, tuple[Merge, str]] = {}  # parameter -> its merge and its name among the targets
        for name in self._tied:
            candidates = self._candidates(name)
            found = next((c for c in candidates if c in merged), None)
            if found is not None and not any(c in keys for c in candidates):
                self._merged[name] = (merged[found], found)
        self._built: tuple[Merge, dict[str, torch.Tensor]] | None = None
        for name in self._tied:
            if name not in self._merged:
                self(name)

    def _candidates(self, name: str) -> list[str]:
        out, prefix = [], self._prefix
        for n in self._tied.get(name, [name]):
            out.append(n)
            if prefix and n.startswith(prefix + "."):
                out.append(n[len(prefix) + 1 :])
            elif prefix:
                out.append(f"{prefix}.{n}")
        return out

    def __call__(self, name: str) -> str:
        tried = self._candidates(name)
        for c in tried:
            if c in self._keys:
                return c
        for c in tried:
            if c in self._renamed:
                return self._renamed[c]
        if name in self._merged:
            raise ValueError(f"parameter {name!r} is merged from {len(self._merged[name][0].keys)} checkpoint "
                             "tensors; read it with resolve.tensor(name, read)")
        raise ValueError(f"the checkpoint has no tensor for parameter {name!r} of {type(self._model).__name__} "
                         f"(tried {tried}); is it a checkpoint of this model's config?")

    def merge(self, name: str) -> Merge | None:
        return self._merged[name][0] if name in self._merged else None

    def dtype_key(self, name: str) -> str:
        """The checkpoint key whose dtype is parameter ``name``'s stored dtype (a merge's first tensor)."""
        return self._merged[name][0].keys[0] if name in self._merged else self(name)

    def tensor(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Parameter ``name`` from ``read(key)`` (whole checkpoint tensors): its key's tensor, or built by its
        merge. A converter's other targets are kept for the next call: a split gives several parameters."""
        if name not in self._merged:
            return read(self(name))
        merge, target = self._merged[name]
        if self._built is None or self._built[0] is not merge:
            self._built = (merge, merge.build(read, self._model))
        return self._built[1][target]


def name_resolver(model: nn.Module) -> Callable[[Collection[str]], Resolver]:
    """``bind(keys)`` -> ``resolve``: ``resolve(name)`` is the key in ``keys`` that holds parameter ``name`` of
    ``model`` (a meta skeleton is enough), ``resolve.merge(name)`` the merge that builds it instead. ``bind``
    checks every parameter up front: a missing one raises ``ValueError`` naming it and the names tried."""

    def bind(keys: Collection[str]) -> Resolver:
        return Resolver(model, keys)

    return bind
