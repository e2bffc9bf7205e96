"""Per-op rules of the layout pass: how an op's output dimensions follow its inputs' spans.

``propagate_dims`` walks the graph once in order; each node's output gets one ``Dim`` per tensor
dimension from the rule registered for its op name (``@rule("view", "reshape", ...)``, the way
inductor registers lowerings), or from broadcasting when no rule is registered: elementwise ops,
linear layers, norms and SDPA keep a dimension of equal size from their inputs.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from rf_compile.passes.nodes import CAT_OPS, PERMUTE_OPS, SPLIT_OPS, VIEW_OPS, example, op_name, permutation
from rf_compile.passes.sequence_shards import exchange_dims, gather_pieces
from rf_compile.passes.spans import (
    Conflict,
    Dim,
    Piece,
    Ranks,
    SpanInfo,
    TensorDims,
    align,
    dim_at,
    has_grid,
    merge_dims,
    normalize,
    slice_dim,
    sub_factors,
    whole,
)
from rf_compile.passes.symbols import shape_of, size_value

log = logging.getLogger(__name__)

Rule = Callable[[torch.fx.Node, tuple, dict[torch.fx.Node, TensorDims]], TensorDims]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the dims rule of the ops called ``names``."""

    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def propagate_dims(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, TensorDims]:
    """For every node, what each dimension of its output is (forward over the graph, once)."""
    dims: dict[torch.fx.Node, TensorDims] = {}
    for node in gm.graph.nodes:
        shape = shape_of(node)
        if node.op not in ("call_function", "call_method", "call_module") or shape is None:
            dims[node] = None
            continue
        handler = RULES.get(op_name(node), broadcast_dims)
        try:
            result = handler(node, shape, dims)
        except (TypeError, ValueError, IndexError, RuntimeError) as error:  # an op form we do not read
            log.debug("layout inference skips %s (%s): %s", node.name, node.target, error)
            result = None
        dims[node] = result if result is not None and any(d is not None for d in result) else None
    return dims


def _source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor an op reads its layout from (its first argument), if it has a known shape."""
    source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    return source if source is not None and shape_of(source) is not None else None


@rule("getitem")
def _getitem(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, TensorDims]) -> TensorDims:
    """``x[...]`` (slices cut spans) or ``chunk(...)[i]`` (the i-th piece)."""
    source = node.args[0] if node.target is operator.getitem and node.args else None
    if not isinstance(source, torch.fx.Node):
        return broadcast_dims(node, shape, dims)
    if isinstance(example(source), (tuple, list)):
        return _split_item_dims(source, node.args[1], shape, dims)
    return _getitem_dims(source, node.args[1], shape, dims)


@rule(*VIEW_OPS)
def _view(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, TensorDims]) -> TensorDims:
    """Where grids are born: a view merging frames x height x width, even of a tensor with no known dimension."""
    source = _source(node)
    if source is None:
        return broadcast_dims(node, shape, dims)
    exchanged = exchange_dims(source, shape, dims)
    if exchanged is not None:
        return exchanged
    tensor = dims.get(source) or (None,) * len(shape_of(source))
    return _view_dims(tensor, shape_of(source), shape)


@rule(*PERMUTE_OPS)
def _permute(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, TensorDims]) -> TensorDims:
    source = _source(node)
    if source is None:
        return broadcast_dims(node, shape, dims)
    return _permute_dims(node, dims[source], shape_of(source)) if dims.get(source) else None


@rule(*CAT_OPS)
def _cat_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, TensorDims]) -> TensorDims:
    """cat: spans of the pieces follow each other along the cat dimension; other dims merge."""
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    pieces = [p for p in pieces if isinstance(p, torch.fx.Node) and shape_of(p) not in (None, (0,))]
    if not pieces or any(len(shape_of(p)) != len(shape) for p in pieces):
        return None
    dim %= len(shape)
    out: list[Dim] = []
    for d, size in enumerate(shape):
        if d == dim:
            lengths = [shape_of(p)[d] for p in pieces]
            if size is None or None in lengths:
                out.append(None)
                continue
            spans: list[tuple[int, SpanInfo]] = []
            for p, length in zip(pieces, lengths, strict=True):
                spans.extend(dim_at(dims.get(p), d) or ((length, None),))
            out.append(normalize(spans))
        else:
            merged: Dim = None
            for p in pieces:
                merged = merge_dims(merged, dim_at(dims.get(p), d))
            out.append(merged)
    return tuple(out)


@rule("stack")
def _stack_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, TensorDims]) -> TensorDims:
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % len(shape)
    out: list[Dim] = []
    for d in range(len(shape)):
        merged: Dim = None
        if d != dim:
            for p in pieces:
                if isinstance(p, torch.fx.Node):
                    merged = merge_dims(merged, dim_at(dims.get(p), d if d < dim else d - 1))
        out.append(merged)
    return tuple(out)


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if shape_of(n) is not None else None)
    return found


def broadcast_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, TensorDims]) -> TensorDims:
    """Elementwise, linear, norms, SDPA, ...: a dimension follows the inputs' dimension of equal size, from the end."""
    inputs = [(n, shape_of(n)) for n in _tensor_inputs(node) if dims.get(n) is not None]
    if not inputs:
        return None
    out = []
    for d, size in enumerate(shape):
        back = d - len(shape)
        merged: Dim = None
        if size not in (None, 1):
            for n, in_shape in inputs:
                if len(in_shape) >= -back and in_shape[back] == size:
                    merged = merge_dims(merged, dims[n][back])
        out.append(merged)
    return tuple(out)


def _view_dims(tensor: TensorDims, in_shape: tuple, out_shape: tuple) -> TensorDims:
    """view / reshape / flatten / unflatten: group dimensions by equal products; merges become grids."""
    if None in in_shape or None in out_shape:
        return None
    groups = align(in_shape, out_shape)
    if groups is None:
        return None
    out: list[Dim] = [None] * len(out_shape)
    for in_dims, out_dims in groups:
        if len(in_dims) == 1 and len(out_dims) == 1:
            out[out_dims[0]] = tensor[in_dims[0]]
            continue
        if not in_dims or not out_dims:
            continue
        infos = [whole(tensor[i], in_shape[i]) for i in in_dims]
        if len(in_dims) == 2 and len(out_dims) == 1 and isinstance(infos[0], Ranks):
            out[out_dims[0]] = gather_pieces(infos[0], tensor[in_dims[1]], in_shape[in_dims[1]])
            continue
        conflict = next((info for info in infos if isinstance(info, Conflict)), None)
        factors: list[int] = []
        for i, info in zip(in_dims, infos, strict=True):
            factors.extend(info if isinstance(info, tuple) else (in_shape[i],))
        factors = [f for f in factors if f != 1]
        before = 1
        for o in out_dims:
            size = out_shape[o]
            if conflict is not None:
                out[o] = ((size, conflict),)
            else:
                sub = sub_factors(factors, before, size)
                out[o] = ((size, sub),) if sub is not None and len(sub) >= 2 else None
            before *= size
    return tuple(out)


def _permute_dims(node: torch.fx.Node, tensor: TensorDims, in_shape: tuple) -> TensorDims:
    """permute / transpose / movedim: each output dimension is the input dimension it was moved from."""
    moved = permutation(node, len(in_shape))
    return None if moved is None else tuple(tensor[source] for source in moved)


def _getitem_dims(source: torch.fx.Node, index: Any, shape: tuple, dims: dict[torch.fx.Node, TensorDims]) -> TensorDims:
    """Basic indexing (slices, ints, None, Ellipsis): slices cut spans; tensor indices end the trace."""
    tensor, in_shape = dims.get(source), shape_of(source)
    if tensor is None:
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (item is None or item is Ellipsis or isinstance(item, (int, slice))) for item in items):  # tensors
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for item in items if item is not None and item is not Ellipsis)
        items[at : at + 1] = [slice(None)] * (len(in_shape) - used)
    items += [slice(None)] * (len(in_shape) - sum(1 for item in items if item is not None))
    out: list[Dim] = []
    d = 0
    for item in items:
        if item is None:
            out.append(None)
        elif isinstance(item, int):
            d += 1
        else:
            size, bounds = in_shape[d], [_bound(item.start), _bound(item.stop)]
            if size is None or item.step not in (None, 1) or "?" in bounds:
                out.append(None)
            else:
                start, stop, _ = slice(*bounds).indices(size)
                out.append(slice_dim(tensor[d], start, max(start, stop)))
            d += 1
    return tuple(out) if len(out) == len(shape) else None


def _bound(value: Any) -> Any:
    """A slice bound as an int (or None): a symbolic one (a node computing a SymInt) under the bindings; "?"
    when it cannot be read."""
    if isinstance(value, torch.fx.Node):
        value = example(value)
    if value is None or isinstance(value, int):
        return value
    found = size_value(value)
    return "?" if found is None else found


def _split_item_dims(
    source: torch.fx.Node, index: Any, shape: tuple, dims: dict[torch.fx.Node, TensorDims]
) -> TensorDims:
    """``chunk(...)[i]`` and friends: the i-th piece along the split dimension."""
    name = op_name(source)
    base = source.args[0] if source.args and isinstance(source.args[0], torch.fx.Node) else None
    if name not in SPLIT_OPS or base is None or dims.get(base) is None or not isinstance(index, int):
        return None
    tensor, in_shape = dims[base], shape_of(base)
    at = 1 if name == "unbind" else 2
    dim = source.kwargs.get("dim", source.args[at] if len(source.args) > at else 0)
    dim = dim % len(in_shape)
    if name == "unbind":
        return tuple(d for i, d in enumerate(tensor) if i != dim)
    pieces = example(source)
    starts = [size_value(piece.shape[dim]) for piece in pieces[:index]]
    if None in starts or shape[dim] is None:
        return None
    start = sum(starts)
    cut = slice_dim(tensor[dim], start, start + shape[dim])
    lengths = {size_value(piece.shape[dim]) for piece in pieces}
    if cut is None and has_grid(tensor[dim]) and len(lengths) == 1 and None not in lengths and len(pieces) > 1:
        # An equal chunk that cuts a grid (a sequence shard): keep what it is a piece of, so that an
        # all-to-all that puts the pieces back together (Ulysses) gives the whole sequence again.
        cut = ((shape[dim], Piece(tensor[dim], len(pieces))),)
    return tuple(cut if i == dim else d for i, d in enumerate(tensor))
