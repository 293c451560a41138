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


def _half_rows(n: int, full_rows: int, flat_rows: int) -> int | None:
    """Rows of one half for a dim 0 of ``n``: B for the doubled batch, B*T for its flattened tokens."""
    if n == full_rows or (flat_rows and n == flat_rows):
        return n // 2
    return None


def split_half(obj: Any, full_rows: int, half: int, flat_rows: int = 0) -> Any:
    """Rows ``[:B]`` (half 0) or ``[B:]`` (half 1) of every tensor whose dim 0 is ``full_rows`` = 2B, or
    ``flat_rows`` = 2B*T (a part of a layer sees tokens flattened batch-major, e.g. OPT's MLP)."""
    if isinstance(obj, torch.Tensor):
        rows = _half_rows(obj.shape[0], full_rows, flat_rows) if obj.dim() > 0 else None
        if rows is not None:
            return obj[:rows] if half == 0 else obj[rows:]
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(split_half(o, full_rows, half, flat_rows) for o in obj)
    if isinstance(obj, list):
        return [split_half(o, full_rows, half, flat_rows) for o in obj]
    if isinstance(obj, dict):
        return {k: split_half(v, full_rows, half, flat_rows) for k, v in obj.items()}
    return obj


def has_rows(obj: Any, full_rows: int, flat_rows: int = 0) -> bool:
    """True if some tensor inside ``obj`` has dim 0 equal to ``full_rows`` (or ``flat_rows``)."""
    if isinstance(obj, torch.Tensor):
        return obj.dim() > 0 and _half_rows(obj.shape[0], full_rows, flat_rows) is not None
    if isinstance(obj, (tuple, list)):
        return any(has_rows(o, full_rows, flat_rows) for o in obj)
    if isinstance(obj, dict):
        return any(has_rows(v, full_rows, flat_rows) for v in obj.values())
    return False


def join_halves(first: Any, second: Any, rows: int, flat_half: int = 0) -> Any:
    """Concatenate two half outputs along dim 0; batch-1 outputs are expanded to ``rows`` first (outputs of
    ``flat_half`` = B*T rows, flattened tokens, are concatenated as they are)."""
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return first
        if first.shape[0] != rows and not (flat_half and first.shape[0] == flat_half):
            first = first.expand(rows, *first.shape[1:])
            second = second.expand(rows, *second.shape[1:])
        return torch.cat([first, second], dim=0)
    if isinstance(first, tuple):
        joined = [join_halves(a, b, rows, flat_half) for a, b in zip(first, second)]
        return type(first)(*joined) if hasattr(first, "_fields") else tuple(joined)
    if isinstance(first, list):
        return [join_halves(a, b, rows, flat_half) for a, b in zip(first, second)]
    if isinstance(first, dict):
        return type(first)({k: join_halves(first[k], second[k], rows, flat_half) for k in first})
    return first


def run_dual(
    inner: nn.Module,
    weights: Callable[[int], dict[str, torch.Tensor]],
    args: tuple,
    kwargs: dict,
    full_rows: int,
    flat_rows: int = 0,
) -> Any:
    """Run ``inner`` on each half of the doubled batch with ``weights(half)`` and join the outputs.

    A module that sees no argument of ``full_rows`` rows (GPT-2's ``wpe`` gets batch-1 position ids) is
    run once per half on the unsplit arguments, and its outputs are expanded to B rows each. A plain tensor
    output (an LM head's logits) is joined into one buffer as soon as the first half is done, so the two
    halves and their join are never all held at once.
    """
    rows = full_rows // 2
    flat_half = flat_rows // 2
    split = has_rows((args, kwargs), full_rows, flat_rows)

    def half_out(half: int) -> Any:
        a = split_half(args, full_rows, half, flat_rows) if split else args
        k = split_half(kwargs, full_rows, half, flat_rows) if split else kwargs
        return functional_call(inner, weights(half), a, k, tie_weights=False, strict=False)

    first = half_out(0)
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] in (rows, flat_half):
        n = first.shape[0]
        joined = first.new_empty((2 * n, *first.shape[1:]))
        joined[:n].copy_(first)
        del first
        joined[n:].copy_(half_out(1))
        return joined
    return join_halves(first, half_out(1), rows, flat_half)
