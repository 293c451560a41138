"""Batch-copy proxies: a module stand-in that runs each copy of a repeated batch with its own weights.

The engine runs the model's own forward once on the batch repeated G times along dim 0: for MeZO rows
``[:B]`` see θ+εz and rows ``[B:]`` see θ−εz; an estimator with q perturbations stacks 2q (or q + 1)
copies. Each decoder layer, and each module outside the layer list that owns parameters, is replaced by a
:class:`ModuleProxy` whose ``runner`` decides which weights each copy gets.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

Runner = Callable[[int, nn.Module, tuple, dict], Any]
Stacked = Callable[[int, int], dict[str, torch.Tensor]]  # copies [a, b): each weight stacked, (b - a, *shape)


class ModuleProxy(nn.Module):
    """Stands in for ``inner``; ``runner(binding_index, inner, args, kwargs)`` computes its output.

    ``inner`` is deliberately not registered as a submodule, so ``model.parameters()`` no longer lists
    the weights the engine now owns. Attribute reads fall through to ``inner`` (models read e.g.
    ``layer.attention_type``). Its parameters live on the meta device; read through the proxy they say
    ``device`` (the compute device), since models move their inputs there (Llama-4:
    ``input_ids.to(self.embed_tokens.weight.device)``, which on meta would drop the ids' values).
    """

    def __init__(self, inner: nn.Module, binding_index: int, runner: Runner,
                 device: torch.device | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_zo_inner", inner)
        object.__setattr__(self, "_zo_runner", runner)
        object.__setattr__(self, "_zo_binding", binding_index)
        object.__setattr__(self, "_zo_device", device)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._zo_runner(self._zo_binding, self._zo_inner, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(object.__getattribute__(self, "_zo_inner"), name)
        device = object.__getattribute__(self, "_zo_device")
        if device is not None and isinstance(value, torch.Tensor) and value.is_meta:
            return MetaOn.of(value, device)
        return value


class MetaOn(torch.Tensor):
    """A meta tensor that reports ``device`` as its device: its shape and dtype are real, its values absent.
    What torch computes from it is a plain tensor, as from the meta tensor itself."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _plain(super().__torch_function__(func, types, args, kwargs or {}))

    @staticmethod
    def of(meta: torch.Tensor, device: torch.device) -> MetaOn:
        placeholder = meta.detach().as_subclass(MetaOn)
        placeholder.reported_device = torch.device(device)
        return placeholder

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        # a MetaOn torch makes inside __torch_function__ (before _plain turns it plain) reports none
        return self.__dict__.get("reported_device") or torch.Tensor.device.__get__(self)


def _plain(obj: Any) -> Any:
    if isinstance(obj, MetaOn):
        return obj.as_subclass(torch.Tensor)
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return type(obj)(_plain(o) for o in obj)
    return obj


def install(model: nn.Module, qualified_name: str, proxy: nn.Module) -> None:
    """Replace the submodule at ``qualified_name`` (e.g. ``"model.layers.3"``) by ``proxy``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleList):
        parent[int(child)] = proxy
    else:
        setattr(parent, child, proxy)


def _group_rows(n: int, full_rows: int, other_rows: tuple[int, ...], n_groups: int) -> int | None:
    """Rows of one copy for a dim 0 of ``n``: B for the repeated batch, B*m for a batch-major multiple of it
    (``other_rows``: its tokens flattened, G*B*T; its heads flattened, G*B*H)."""
    if n == full_rows or n in other_rows:
        return n // n_groups
    return None


def split_group(obj: Any, full_rows: int, group: int, n_groups: int, other_rows: tuple[int, ...] = ()) -> Any:
    """Rows of copy ``group`` (of ``n_groups``) of every tensor whose dim 0 is ``full_rows`` = G*B, or one of
    ``other_rows``: batch-major multiples of it (a part of a layer sees tokens flattened, e.g. OPT's MLP, G*B*T;
    BLOOM's ALiBi bias has a row per sequence and head, G*B*H)."""
    if isinstance(obj, torch.Tensor):
        rows = _group_rows(obj.shape[0], full_rows, other_rows, n_groups) if obj.dim() > 0 else None
        if rows is not None:
            return obj[group * rows : (group + 1) * rows] if group < n_groups - 1 else obj[group * rows :]
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(split_group(o, full_rows, group, n_groups, other_rows) for o in obj)
    if isinstance(obj, list):
        return [split_group(o, full_rows, group, n_groups, other_rows) for o in obj]
    if isinstance(obj, dict):
        return {k: split_group(v, full_rows, group, n_groups, other_rows) for k, v in obj.items()}
    return obj


def has_rows(obj: Any, full_rows: int, other_rows: tuple[int, ...] = ()) -> bool:
    """True if some tensor inside ``obj`` has dim 0 equal to ``full_rows`` (or one of ``other_rows``)."""
    if isinstance(obj, torch.Tensor):
        return obj.dim() > 0 and (obj.shape[0] == full_rows or obj.shape[0] in other_rows)
    if isinstance(obj, (tuple, list)):
        return any(has_rows(o, full_rows, other_rows) for o in obj)
    if isinstance(obj, dict):
        return any(has_rows(v, full_rows, other_rows) for v in obj.values())
    return False


def join_groups(outs: list[Any], rows: int, other_rows: tuple[int, ...] = ()) -> Any:
    """Concatenate the copies' outputs along dim 0; batch-1 outputs are expanded to ``rows`` first (outputs of
    one of ``other_rows``, a copy's share of a batch-major multiple, are concatenated as they are)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return first
        if first.shape[0] != rows and first.shape[0] not in other_rows:
            outs = [o.expand(rows, *o.shape[1:]) for o in outs]
        return torch.cat(outs, dim=0)
    if isinstance(first, tuple):
        joined = [join_groups(list(parts), rows, other_rows) for parts in zip(*outs)]
        return type(first)(*joined) if hasattr(first, "_fields") else tuple(joined)
    if isinstance(first, list):
        return [join_groups(list(parts), rows, other_rows) for parts in zip(*outs)]
    if isinstance(first, dict):
        return type(first)({k: join_groups([o[k] for o in outs], rows, other_rows) for k in first})
    return first


def _chunks_differ(value: Any, full_rows: int, n_groups: int) -> bool:
    """True for a tensor of ``full_rows`` rows whose ``n_groups`` chunks are not all equal."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != full_rows:
        return False
    chunks = value.chunk(n_groups)
    return not all(torch.equal(chunks[0], c) for c in chunks[1:])


def run_groups(
    inner: nn.Module,
    weights: Callable[[int], dict[str, torch.Tensor]],
    args: tuple,
    kwargs: dict,
    n_groups: int,
    full_rows: int,
    other_rows: tuple[int, ...] = (),
    batchless_rows: int = 0,
    stacked: Stacked | None = None,
    spans: Sequence[tuple[int, int]] = (),
) -> Any:
    """Run ``inner`` on each of the ``n_groups`` copies of the batch with ``weights(group)`` and join them.

    ``stacked`` and ``spans``: run the copies of each span ``[a, b)`` in one vmapped call of ``inner`` on
    ``stacked(a, b)`` (every weight with a leading dim of ``b - a``), one Python pass per span instead of per
    copy (:func:`run_stacked`). A module that vmap cannot run (a custom autograd.Function, a data-dependent
    branch) falls back to one copy at a time, with a warning, once per module class.

    The copies are run in order, so ``weights(g)`` may reuse the buffers of copy ``g - 1``. One copy is a
    plain call. A module that sees no argument of ``full_rows`` rows (GPT-2's ``wpe`` gets batch-1 position
    ids) is run once per copy on the unsplit arguments, and its outputs are expanded to B rows each. A plain
    tensor output (an LM head's logits) is written into one buffer copy by copy, so the copies and their join
    are never all held at once.

    ``batchless_rows``: a dim 0 that a keyword tensor may have without carrying the batch (the head count:
    MPT's ALiBi bias is ``(heads, 1, T)``). Where it equals ``full_rows``, a keyword tensor is split only if its
    copies' chunks are equal, as everything the model builds from the repeated batch before its layers is
    (masks, positions), or if it is the layer's ``hidden_states`` (each copy's own activations); one whose
    chunks differ is passed whole.
    """
    if n_groups == 1:
        return functional_call(inner, weights(0), args, kwargs, tie_weights=False, strict=False)
    rows = full_rows // n_groups
    one_copy = tuple(n // n_groups for n in other_rows)
    split = has_rows((args, kwargs), full_rows, other_rows)
    whole = {}
    if split and batchless_rows == full_rows:
        whole = {name: v for name, v in kwargs.items()
                 if name != "hidden_states" and _chunks_differ(v, full_rows, n_groups)}
    rest = {name: v for name, v in kwargs.items() if name not in whole} if whole else kwargs
    if stacked is not None and split and len(spans) < n_groups and type(inner) not in _UNSTACKABLE:
        versions = _versions((args, kwargs))
        try:
            return run_stacked(inner, stacked, spans, args, rest, whole, n_groups, full_rows, other_rows)
        except Exception as err:  # vmap's refusals have no common type; the loop below is exact
            if _versions((args, kwargs)) != versions:  # the module changed an input in place: no clean retry
                raise
            if not isinstance(err, torch.OutOfMemoryError):  # a full device is not the module's fault
                _UNSTACKABLE.add(type(inner))
                warnings.warn(f"{type(inner).__name__} cannot run its copies stacked under torch.func.vmap "
                              f"({type(err).__name__}: {str(err)[:120]}); it runs them one at a time", stacklevel=2)

    def group_out(group: int) -> Any:
        a = split_group(args, full_rows, group, n_groups, other_rows) if split else args
        k = {**split_group(rest, full_rows, group, n_groups, other_rows), **whole} if split else kwargs
        return functional_call(inner, weights(group), a, k, tie_weights=False, strict=False)

    first = group_out(0)
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] in (rows, *one_copy):
        n = first.shape[0]
        joined = first.new_empty((n_groups * n, *first.shape[1:]))
        joined[:n].copy_(first)
        del first
        for group in range(1, n_groups):
            joined[group * n : (group + 1) * n].copy_(group_out(group))
        return joined
    outs = [first] + [group_out(group) for group in range(1, n_groups)]
    return join_groups(outs, rows, one_copy)


_TENSOR = object()  # where a tensor was among a module's outputs
_UNSTACKABLE: set[type] = set()  # module classes whose forward vmap refused: their copies run one at a time


def unstackable_modules() -> list[str]:
    """The module classes whose copies vmap refused in this process, so they run one copy at a time."""
    return sorted(t.__name__ for t in _UNSTACKABLE)


def run_stacked(inner: nn.Module, stacked: Stacked, spans: Sequence[tuple[int, int]], args: tuple, kwargs: dict,
                whole: dict, n_groups: int, full_rows: int, other_rows: tuple[int, ...] = ()) -> Any:
    """``inner`` on the copies of each span ``[a, b)`` at once: ``torch.func.vmap`` over ``stacked(a, b)`` and
    over each input with the batch's rows, viewed as ``(n_groups, rows / n_groups, ...)`` and cut to the span
    (every other input, and the keyword tensors in ``whole``, is shared by the copies). The spans' outputs are
    joined along dim 0 as :func:`run_groups` joins the copies'."""
    rows = full_rows // n_groups
    per_copy = {rows, *(n // n_groups for n in other_rows)}
    spec: list[Any] = []  # the outputs' tree, and the non-tensor leaves in place (vmap returns tensors only)

    def call(weights: dict, a_: tuple, k_: dict) -> tuple:
        out = functional_call(inner, weights, a_, k_, tie_weights=False, strict=False)
        leaves, tree = pytree.tree_flatten(out)
        spec[:] = [tree, [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]]
        return tuple(x for x in leaves if isinstance(x, torch.Tensor))

    pieces = []
    for a, b in spans:
        (a_in, k_in), (a_dims, k_dims) = _stack_inputs((args, kwargs), full_rows, other_rows, n_groups, a, b)
        k_in, k_dims = {**k_in, **whole}, {**k_dims, **dict.fromkeys(whole)}
        tensors = vmap(call, in_dims=(0, a_dims, k_dims))(stacked(a, b), a_in, k_in)
        it = iter(_unstack(t, rows, per_copy) for t in tensors)
        tree, leaves = spec
        pieces.append(pytree.tree_unflatten([next(it) if x is _TENSOR else x for x in leaves], tree))
    return pieces[0] if len(pieces) == 1 else _cat_pieces(pieces)


def _versions(obj: Any) -> list[int]:
    """The version counters of the tensors in ``obj``: they move when a tensor is written in place."""
    return [t._version for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _stack_inputs(obj: Any, full_rows: int, other_rows: tuple[int, ...], n_groups: int, a: int, b: int
                  ) -> tuple[Any, Any]:
    """(value, vmap in_dims) of ``obj``: a tensor with the batch's rows as ``(b - a, rows per copy, ...)``
    (copies a..b-1) and dim 0; anything else as it is and None."""
    if isinstance(obj, torch.Tensor):
        rows = _group_rows(obj.shape[0], full_rows, other_rows, n_groups) if obj.dim() > 0 else None
        if rows is None:
            return obj, None
        return obj.unflatten(0, (n_groups, rows))[a:b], 0
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        pairs = [_stack_inputs(o, full_rows, other_rows, n_groups, a, b) for o in obj]
        return type(obj)(p[0] for p in pairs), type(obj)(p[1] for p in pairs)
    if isinstance(obj, dict):
        pairs = {k: _stack_inputs(v, full_rows, other_rows, n_groups, a, b) for k, v in obj.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return obj, None


def _unstack(t: torch.Tensor, rows: int, per_copy: set[int]) -> torch.Tensor:
    """A vmapped output ``(copies, *copy_shape)`` as the copies joined along dim 0; a copy's output of another
    dim 0 is expanded to ``rows`` (the batch) first, a scalar one is the first copy's (as :func:`join_groups`)."""
    if t.dim() == 1:
        return t[0]
    if t.shape[1] not in per_copy:
        t = t.expand(t.shape[0], rows, *t.shape[2:])
    return t.reshape(-1, *t.shape[2:])


def _cat_pieces(pieces: list[Any]) -> Any:
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return first if first.dim() == 0 else torch.cat(pieces, dim=0)
    if isinstance(first, tuple):
        joined = [_cat_pieces(list(p)) for p in zip(*pieces)]
        return type(first)(*joined) if hasattr(first, "_fields") else tuple(joined)
    if isinstance(first, list):
        return [_cat_pieces(list(p)) for p in zip(*pieces)]
    if isinstance(first, dict):
        return type(first)({k: _cat_pieces([p[k] for p in pieces]) for k in first})
    return first
