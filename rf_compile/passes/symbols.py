"""The size symbols of a graph compiled with dynamic shapes, and the nodes that read them at run time.

A symbolic site's layout is found again for every call shape: the op receives the value of each
symbol (``sizes``), and ``infer_layout`` reads the graph's shapes under them. The symbols come
from Dynamo's graph (``s0``, ``s1``, ... and data-dependent ``u0``), never from names.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import sympy
import torch

from rf_compile.passes.nodes import example

# Values of the graph's size symbols under which shapes are read (symbolic graphs); None: hints only.
_BINDINGS: contextvars.ContextVar[dict[sympy.Symbol, sympy.Integer] | None] = contextvars.ContextVar(
    "rf_bindings", default=None
)


def _sizes_of(value) -> list:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, torch.SymInt):
        return [value]
    if isinstance(value, (tuple, list)):
        return [size for item in value for size in _sizes_of(item)]
    return []


def graph_symbols(gm: torch.fx.GraphModule) -> list[sympy.Symbol]:
    """Every symbol in the sizes of the graph's values, sorted by name."""
    found: set[sympy.Symbol] = set()
    for node in gm.graph.nodes:
        for size in _sizes_of(example(node)):
            if isinstance(size, torch.SymInt):
                found |= size.node.expr.free_symbols
    return sorted(found, key=str)


def hint_bindings(gm: torch.fx.GraphModule, symbols: list[sympy.Symbol]) -> dict[sympy.Symbol, int]:
    """The compile-time example value of each backed symbol (data-dependent ones have none)."""
    for node in gm.graph.nodes:
        for size in _sizes_of(example(node)):
            if isinstance(size, torch.SymInt):
                env = size.node.shape_env
                known = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
                return {symbol: int(known[symbol]) for symbol in symbols if symbol in known}
    return {}


def symbol_readers(
    gm: torch.fx.GraphModule, symbols: list[sympy.Symbol], before: torch.fx.Node, known: dict
) -> tuple[tuple[sympy.Symbol, ...], list[torch.fx.Node]]:
    """The symbols that can be read before ``before``, and a node giving each one's value at run time.

    A reader is a SymInt input, or ``sym_size`` of a tensor holding the symbol as a whole size (new
    ``sym_size`` nodes go right before ``before`` and are remembered in ``known`` for later sites).
    A symbol with no reader yet (a later block's data-dependent length) is left out: it cannot
    matter to this site.
    """
    readable: list[sympy.Symbol] = []
    readers: list[torch.fx.Node] = []
    for symbol in symbols:
        reader = known.get(symbol) or _existing_reader(gm, symbol)
        if reader is None:
            found = _tensor_holding(gm, symbol, before)
            if found is None:
                continue
            node, dim = found
            with gm.graph.inserting_before(before):
                reader = gm.graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
            reader.meta["example_value"] = example(node).shape[dim]
            known[symbol] = reader
        readable.append(symbol)
        readers.append(reader)
    return tuple(readable), readers


def _existing_reader(gm: torch.fx.GraphModule, symbol: sympy.Symbol) -> torch.fx.Node | None:
    for node in gm.graph.find_nodes(op="placeholder"):
        value = example(node)
        if isinstance(value, torch.SymInt) and value.node.expr == symbol:
            return node
    return None


def _tensor_holding(gm: torch.fx.GraphModule, symbol: sympy.Symbol, before: torch.fx.Node):
    for node in gm.graph.nodes:
        if node is before:
            return None
        value = example(node)
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == symbol:
                    return node, dim
    return None


@contextlib.contextmanager
def bound(bindings: dict[sympy.Symbol, int] | None) -> Iterator[None]:
    """Read every symbolic size under ``bindings`` (symbol -> value) inside the block."""
    token = _BINDINGS.set({symbol: sympy.Integer(value) for symbol, value in (bindings or {}).items()})
    try:
        yield
    finally:
        _BINDINGS.reset(token)


def size_value(size: Any) -> int | None:
    """A size as an int: itself, or a symbolic size evaluated under the current bindings (None if unbound)."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        bindings = _BINDINGS.get()
        if bindings and expr.free_symbols <= bindings.keys():
            expr = expr.xreplace(bindings)
        if expr.is_number:
            return int(expr)
    return None


def shape_of(node: torch.fx.Node) -> tuple[int | None, ...] | None:
    """Static shape of a tensor node; symbolic sizes are None. None for non-tensors."""
    value = example(node)
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(size_value(size) for size in value.shape)
