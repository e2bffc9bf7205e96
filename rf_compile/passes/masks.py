"""Square attention masks that are an outer product of a per-query and a per-key factor.

HunyuanVideo 1.5 builds its [B, 1, N, N] mask as ``m.view(B, 1, 1, N).repeat(1, 1, N, 1)``
AND its transpose: one factor varies only along keys, the other only along queries. Such a mask
runs sparse exactly: the key factor is a key-padding mask, and the rows the query factor masks
entirely are zero (what SDPA returns for a fully masked row). This module proves the structure
from the graph (which dimensions a value is constant along, through repeat / expand / transpose /
views / elementwise ops); it never assumes it from a shape.
"""

from __future__ import annotations

import torch

from rf_compile.passes.nodes import example, op_name, permutation, same_size

# Boolean masks combine by AND, additive ones by +; the product of two {0, 1} masks is an AND too.
_AND_OPS = {"and_", "__and__", "logical_and", "bitwise_and", "mul", "__mul__"}
_ADD_OPS = {"add", "__add__"}
_ELEMENTWISE = _AND_OPS | _ADD_OPS | {"or_", "__or__", "logical_or", "sub", "__sub__", "masked_fill", "where"}
_UNARY = {"bool", "to", "float", "half", "bfloat16", "type", "contiguous", "clone", "detach", "logical_not",
          "__invert__", "bitwise_not", "neg", "log"}  # fmt: skip
_REPEAT = {"repeat", "expand", "expand_as"}
_PERMUTE = {"transpose", "permute", "swapaxes", "swapdims"}
_VIEW = {"view", "reshape", "unsqueeze", "squeeze", "view_as", "reshape_as"}
_MAX_DEPTH = 16


def outer_product_factors(mask_node: torch.fx.Node, seq_len) -> tuple[torch.fx.Node, torch.fx.Node] | str:
    """(row factor, key factor) nodes of a [B|1, 1, N, N] mask built as their outer product, or why not.

    The row factor is constant along keys (dim 3), the key factor along queries (dim 2); both are
    4-D, so ``row[..., :1]`` is a [B|1, 1, N, 1] row mask and ``key[..., :1, :]`` a key-padding mask.
    """
    mask = example(mask_node)
    if mask.dim() != 4:
        return f"it is {mask.dim()}-D"
    if not _one(mask.shape[1]):
        return f"it holds one mask per head ({mask.shape[1]} along dim 1)"
    node = mask_node
    while op_name(node) in _UNARY - {"logical_not", "__invert__", "bitwise_not", "neg", "log"}:
        node = node.args[0]
    name = op_name(node)
    combines = _AND_OPS if mask.dtype == torch.bool else _ADD_OPS
    operands = [a for a in node.args if isinstance(a, torch.fx.Node) and isinstance(example(a), torch.Tensor)]
    if name not in combines or len(operands) != 2:
        return "it is not built in this graph as an outer product (AND of boolean, or sum of additive factors)"
    for row, key in (operands, operands[::-1]):
        if example(row).dim() == 4 and example(key).dim() == 4 and 3 in constant_dims(row) and 2 in constant_dims(key):
            return row, key
    return "its two factors do not vary one along queries only and one along keys only"


def constant_dims(node: torch.fx.Node, depth: int = 0) -> set[int]:
    """Dimensions of ``node``'s value along which it is provably constant (size 1, repeated, broadcast)."""
    value = example(node)
    if not isinstance(value, torch.Tensor):
        return set()
    ones = {d for d, size in enumerate(value.shape) if _one(size)}
    if depth >= _MAX_DEPTH or node.op not in ("call_function", "call_method") or not node.args:
        return ones
    name, source = op_name(node), node.args[0]
    if not isinstance(source, torch.fx.Node) or not isinstance(example(source), torch.Tensor):
        return ones
    src_value = example(source)
    if name in _UNARY:
        return ones | constant_dims(source, depth + 1)
    if name in _REPEAT and src_value.dim() == value.dim():
        inner = constant_dims(source, depth + 1)
        return ones | inner | {d for d in range(value.dim()) if _one(src_value.shape[d])}
    if name in _PERMUTE:
        moved = permutation(node, src_value.dim())
        inner = constant_dims(source, depth + 1)
        return ones | ({d for d, src in enumerate(moved) if src in inner} if moved else set())
    if name in _VIEW:
        return ones | _view_constant_dims(src_value.shape, value.shape, constant_dims(source, depth + 1))
    if name in _ELEMENTWISE:
        result: set[int] | None = None
        for arg in [*node.args, *node.kwargs.values()]:
            if isinstance(arg, torch.fx.Node) and isinstance(example(arg), torch.Tensor):
                inner = _aligned(constant_dims(arg, depth + 1), example(arg).dim(), value.dim())
                result = inner if result is None else result & inner
        return ones | (result or set())
    return ones


def _aligned(dims: set[int], ndim: int, out_ndim: int) -> set[int]:
    """Constant dims of a broadcast operand in the output's coordinates (missing leading dims are constant)."""
    shift = out_ndim - ndim
    return {d + shift for d in dims} | set(range(shift))


def _view_constant_dims(in_shape, out_shape, inner: set[int]) -> set[int]:
    """A view that only adds or drops size-1 dimensions keeps the others, in order."""
    kept_in = [d for d, size in enumerate(in_shape) if not _one(size)]
    kept_out = [d for d, size in enumerate(out_shape) if not _one(size)]
    if len(kept_in) != len(kept_out):
        return set()
    if not all(same_size(in_shape[a], out_shape[b]) for a, b in zip(kept_in, kept_out)):
        return set()
    return {b for a, b in zip(kept_in, kept_out) if a in inner}


def _one(size) -> bool:
    return same_size(size, 1)
