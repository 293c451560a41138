"""Dual-batch proxies: a module stand-in that runs each half of a doubled batch with its own weights.

The engine runs the model's own forward once on the batch doubled along dim 0: rows ``[:B]`` see θ+εz and
rows ``[B:]`` see θ−εz. Each decoder layer, and each module outside the layer list that owns parameters,
is replaced by a :class:`ModuleProxy` whose ``runner`` decides which weights each half gets.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

Runner = Callable[[int, nn.Module, tuple, dict], Any]


class ModuleProxy(nn.Module):
    """Stands in for ``inner``; ``runner(binding_index, inner, args, kwargs)`` computes its output.

    ``inner`` is deliberately not registered as a submodule, so ``model.parameters()`` no longer lists
    the weights the engine now owns. Attribute reads fall through to ``inner`` (models read e.g.
    ``layer.attention_type``).
    """

    def __init__(self, inner: nn.Module, binding_index: int, runner: Runner) -> None:
        super().__init__()
        object.__setattr__(self, "_zo_inner", inner)
        object.__setattr__(self, "_zo_runner", runner)
        object.__setattr__(self, "_zo_binding", binding_index)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._zo_runner(self._zo_binding, self._zo_inner, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_zo_inner"), name)


def install(model: nn.Module, qualified_name: str, proxy: nn.Module) -> None:
    """Replace the submodule at ``qualified_name`` (e.g. ``"model.layers.3"``) by ``proxy``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleList):
        parent[int(child)] = proxy
    else:
        setattr(parent, child, proxy)


def split_half(obj: Any, full_rows: int, half: int) -> Any:
    """Rows ``[:B]`` (half 0) or ``[B:]`` (half 1) of every tensor whose dim 0 is ``full_rows`` = 2B."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() > 0 and obj.shape[0] == full_rows:
            rows = full_rows // 2
            return obj[:rows] if half == 0 else obj[rows:]
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(split_half(o, full_rows, half) for o in obj)
    if isinstance(obj, list):
        return [split_half(o, full_rows, half) for o in obj]
    if isinstance(obj, dict):
        return {k: split_half(v, full_rows, half) for k, v in obj.items()}
    return obj


def has_rows(obj: Any, full_rows: int) -> bool:
    """True if some tensor inside ``obj`` has dim 0 equal to ``full_rows``."""
    if isinstance(obj, torch.Tensor):
        return obj.dim() > 0 and obj.shape[0] == full_rows
    if isinstance(obj, (tuple, list)):
        return any(has_rows(o, full_rows) for o in obj)
    if isinstance(obj, dict):
        return any(has_rows(v, full_rows) for v in obj.values())
    return False


def join_halves(first: Any, second: Any, rows: int) -> Any:
    """Concatenate two half outputs along dim 0; batch-1 outputs are expanded to ``rows`` first."""
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return first
        if first.shape[0] != rows:
            first = first.expand(rows, *first.shape[1:])
            second = second.expand(rows, *second.shape[1:])
        return torch.cat([first, second], dim=0)
    if isinstance(first, tuple):
        joined = [join_halves(a, b, rows) for a, b in zip(first, second)]
        return type(first)(*joined) if hasattr(first, "_fields") else tuple(joined)
    if isinstance(first, list):
        return [join_halves(a, b, rows) for a, b in zip(first, second)]
    if isinstance(first, dict):
        return type(first)({k: join_halves(first[k], second[k], rows) for k in first})
    return first


def run_dual(
    inner: nn.Module,
    weights: Callable[[int], dict[str, torch.Tensor]],
    args: tuple,
    kwargs: dict,
    full_rows: int,
) -> Any:
    """Run ``inner`` on each half of the doubled batch with ``weights(half)`` and join the outputs.

    A module that sees no argument of ``full_rows`` rows (GPT-2's ``wpe`` gets batch-1 position ids) is
    run once per half on the unsplit arguments, and its outputs are expanded to B rows each.
    """
    rows = full_rows // 2
    split = has_rows((args, kwargs), full_rows)
    outs = []
    for half in (0, 1):
        a = split_half(args, full_rows, half) if split else args
        k = split_half(kwargs, full_rows, half) if split else kwargs
        outs.append(functional_call(inner, weights(half), a, k, tie_weights=False, strict=False))
    return join_halves(outs[0], outs[1], rows)
