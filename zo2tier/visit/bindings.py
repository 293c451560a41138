"""Which weights each proxied module sees: its record and its parameters' spans in the record's flat buffer."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from zo2tier.model.blocks import ModelLayout
from zo2tier.model.proxy import ModuleProxy, Runner, install
from zo2tier.tiers.codec import INT8_GROUP
from zo2tier.tiers.records import BlockRecord, ParamSlot


@dataclass(frozen=True)
class Binding:
    """A proxied module: the record holding its weights, and its (slot, local names) pairs. A decoder layer
    is bound part by part (its attention, MLP, norms: ``ModelLayout.parts``); ``lo`` and ``numel`` are the
    part's span in its record, and its θ±εz views start at 0 in the scratch."""

    record: int
    params: tuple[tuple[ParamSlot, tuple[str, ...]], ...]
    lo: int = 0
    numel: int = 0

    def named(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's parameters as views of ``flat``, which holds the binding's span from 0."""
        out = {}
        for slot, local in self.params:
            r = slot.offset - self.lo
            view = flat[r : r + slot.spec.numel].view(slot.spec.shape)
            for name in local:
                out[name] = view
        return out

    def named_stacked(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's parameters stacked over the copies: views ``(copies, *shape)`` of ``rows``, which
        holds one copy's span from 0 per row."""
        out = {}
        for slot, local in self.params:
            r = slot.offset - self.lo
            view = rows[:, r : r + slot.spec.numel].unflatten(1, slot.spec.shape)
            for name in local:
                out[name] = view
        return out


def whole(record: BlockRecord) -> Binding:
    """All of ``record`` as one binding (a visit outside the forward)."""
    return Binding(record.index, tuple((slot, ()) for slot in record.slots), 0, record.numel)


def one_slot(record: BlockRecord, slot: ParamSlot) -> Binding:
    return Binding(record.index, ((slot, ()),), slot.offset, slot.spec.numel)


@dataclass(frozen=True)
class ModelBindings:
    """Every binding, and for each block record the indices of its parts' bindings."""

    bindings: tuple[Binding, ...]
    parts_of: Mapping[int, frozenset[int]]
    on_groups: frozenset[int]  # blocks whose parts tile them on int8 groups (each part encodes on its own)

    def __getitem__(self, index: int) -> Binding:
        return self.bindings[index]

    def largest_part(self, resident: int) -> int:
        return max((b.numel for b in self.bindings if b.record != resident), default=0)

    def largest_resident(self, resident: int) -> int:
        return max((b.numel for b in self.bindings if b.record == resident), default=0)


def tile_on_groups(parts: list[Binding], numel: int) -> bool:
    """True if ``parts`` tile a block of ``numel`` elements and each starts on an int8 group."""
    spans = sorted((b.lo, b.lo + b.numel) for b in parts)
    return (bool(spans) and spans[0][0] == 0 and spans[-1][1] == numel
            and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
            and all(lo % INT8_GROUP == 0 for lo, _ in spans))


def bind_model(model: nn.Module, layout: ModelLayout, records: list[BlockRecord], runner: Runner,
               device: torch.device | None = None) -> ModelBindings:
    """Replace each decoder layer's parts and each resident module by a proxy calling ``runner`` (its
    parameters read through it report ``device``)."""
    modules = dict(model.named_modules())
    alias_of: dict[str, list[str]] = {}
    for alias, canonical in layout.aliases.items():
        alias_of.setdefault(canonical, []).append(alias)
    names_by_id = {p.param_id: [p.name, *alias_of.get(p.name, [])] for p in layout.params}
    bindings: list[Binding] = []

    def bind(prefix: str, record: BlockRecord) -> int:
        bindings.append(_binding(prefix, record, names_by_id))
        install(model, prefix, ModuleProxy(modules[prefix], len(bindings) - 1, runner, device))
        return len(bindings) - 1

    parts_of = {i: frozenset(bind(part, records[i]) for part in layout.parts.get(name, (name,)))
                for i, name in enumerate(layout.block_names)}
    for name in layout.resident_names:
        bind(name, records[-1])
    on_groups = frozenset(i for i, parts in parts_of.items()
                          if tile_on_groups([bindings[b] for b in parts], records[i].numel))
    return ModelBindings(tuple(bindings), parts_of, on_groups)


def _binding(prefix: str, record: BlockRecord, names_by_id: dict[int, list[str]]) -> Binding:
    pairs = []
    for slot in record.slots:
        local = tuple(n[len(prefix) + 1 :] for n in names_by_id[slot.spec.param_id] if n.startswith(prefix + "."))
        if local:
            pairs.append((slot, local))
    lo = min((slot.offset for slot, _ in pairs), default=0)
    numel = max((slot.offset + slot.spec.numel for slot, _ in pairs), default=0) - lo
    return Binding(record.index, tuple(pairs), lo, numel)


def release_weights(modules: list[nn.Module], device: torch.device) -> None:
    """The engine owns the weights now: parameters become meta placeholders, buffers move to ``device``.
    ``modules``: the model's modules as they were before proxies replaced some of them."""
    for module in modules:
        for key, p in list(module.named_parameters(recurse=False)):
            setattr(module, key, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
        for key, b in list(module.named_buffers(recurse=False)):
            setattr(module, key, b.to(device))  # stays a buffer, persistent or not
