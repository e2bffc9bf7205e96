"""Infer the video layout of an attention site from the Dynamo graph alone.

The token dimension of a video DiT's attention is built in the graph: a 5-D latent is patch
embedded (conv, or a reshape to patches and a Linear), its frames x height x width grid is
folded into one dimension by ``flatten`` / ``view`` / ``reshape`` (frame-major), and text tokens
are joined to it by ``torch.cat``. This module follows every tensor dimension forward through the
graph once and records, per dimension, which spans are a flattened grid and of what factors
(``(3, 4, 6)`` for 3 frames of 4x6 tokens) and which spans are something else (text). At an SDPA
node the query's (and key's) sequence dimension then reads as ``prefix + grid + suffix``.

What it uses: shapes of ``node.meta["example_value"]`` (fake tensors), the semantics of view-like,
permute-like, indexing, ``cat`` / ``stack`` / ``chunk`` ops, and broadcasting for everything else.
What it never uses: module, parameter or class names. It is not the place to decide whether a site
should be sparse (cross-attention, masks, head dims are for the other passes); it only answers
"which tokens are video, and on what grid", or says in words why it cannot.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import math
import operator
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx
import sympy
import torch
import torch.fx

from rf_compile.layout import VideoLayout
from rf_compile.passes.nodes import SDPA_TARGETS, example, sdpa_arguments

log = logging.getLogger(__name__)

LAYOUT_HINT = "pass options={'layout': (frames, height, width, prefix, suffix)}"


class PartialGraph(str):
    """The reason a site has no layout when its graph holds no video grid at all: the graph is part
    of a model (regional compilation, a graph break before the patch embedding). The layout can then
    come from the calling model's computation (``passes.parent_trace``)."""


# Values of the graph's size symbols under which shapes are read (symbolic graphs); empty: hints only.
_BINDINGS: contextvars.ContextVar[dict[sympy.Symbol, int] | None] = contextvars.ContextVar("rf_bindings", default=None)


@contextlib.contextmanager
def bound(bindings: dict[sympy.Symbol, int] | None):
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

# What one span of a dimension is: None (not a flattened grid: text, or unknown), the grid
# factors (outermost first, sizes of 1 dropped, at least two), or a _Conflict.
_Info = Any
# A dimension: None (one span of unknown tokens) or spans (length, info) covering it in order.
_Dim = tuple[tuple[int, _Info], ...] | None
# A tensor: None (no dimension known) or one _Dim per dimension.
_Tensor = tuple[_Dim, ...] | None


@dataclasses.dataclass(frozen=True)
class _Conflict:
    """Two different grids claim the same tokens."""

    what: str


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One of ``parts`` equal chunks of a dimension whose spans are ``whole`` (a sequence shard, e.g.
    this rank's part under context parallelism); the chunk cuts a grid, so locally it is no grid."""

    whole: Any  # _Dim
    parts: int


@dataclasses.dataclass(frozen=True)
class _Ranks:
    """Dimension 0 after a ``parts``-way all-to-all: which rank each slice came from."""

    parts: int


@dataclasses.dataclass(frozen=True)
class _Sharded:
    """Tokens of sequence shards that no VideoLayout describes (interleaved, or a shard alone)."""

    what: str


_VIEW_OPS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as"}
_PERMUTE_OPS = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
_CAT_OPS = {"cat", "concat", "concatenate"}
_SPLIT_OPS = {"chunk", "split", "tensor_split", "split_with_sizes", "unbind"}
_ALL_TO_ALL_OPS = {"all_to_all_single"}
_WAIT_OPS = {"wait_tensor"}


# -- graph-wide facts, computed once per graph ---------------------------------------------------


@dataclasses.dataclass
class _GraphFacts:
    num_nodes: int
    digraph: nx.DiGraph
    dims: dict[torch.fx.Node, _Tensor]

    @functools.cached_property
    def has_video_grid(self) -> bool:
        """Whether any tensor of the graph has a token dimension built by flattening a frames x height x
        width grid. The last dimension is left out: it holds channels (a rotary embedding's view of them
        as heads x pairs x 2 is no video grid)."""
        return any(
            isinstance(info, tuple) and len(info) == 3
            for tensor in self.dims.values()
            if tensor is not None
            for dim in tensor[:-1]
            if dim is not None
            for _, info in dim
        )


_FACTS: weakref.WeakKeyDictionary[torch.fx.GraphModule, dict[tuple, _GraphFacts]] = weakref.WeakKeyDictionary()


def fx_digraph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The graph of ``gm`` as a networkx DiGraph (edge: node -> user), cached per graph module."""
    return _facts(gm).digraph


def _facts(gm: torch.fx.GraphModule, holding: Iterable[torch.fx.Node] = ()) -> _GraphFacts:
    """The cached facts of ``gm``, recomputed if the graph changed (node count, or ``holding`` unknown)."""
    per_bindings = _FACTS.setdefault(gm, {})
    key = tuple(sorted((str(symbol), value) for symbol, value in (_BINDINGS.get() or {}).items()))
    facts = per_bindings.get(key)
    if facts is None or facts.num_nodes != len(gm.graph.nodes) or any(n not in facts.dims for n in holding):
        digraph = nx.DiGraph()
        digraph.add_nodes_from(gm.graph.nodes)
        digraph.add_edges_from((node, user) for node in gm.graph.nodes for user in node.users)
        facts = _GraphFacts(len(gm.graph.nodes), digraph, _propagate_dims(gm))
        if len(per_bindings) >= 16:  # one entry per call shape met at run time: keep the newest few
            per_bindings.pop(next(iter(per_bindings)))
        per_bindings[key] = facts
    return facts


# -- the public entry point --------------------------------------------------------------------


def infer_site_layout(
    gm: torch.fx.GraphModule, sdpa_node: torch.fx.Node, bindings: dict[sympy.Symbol, int] | None = None
) -> VideoLayout | str:
    """The VideoLayout of the SDPA site ``sdpa_node`` in the Dynamo graph ``gm``, or why there is none.

    Parameters
    ----------
    gm:
        A torch-level graph as a Dynamo backend receives it (``meta["example_value"]`` set).
    sdpa_node:
        A node calling ``torch.nn.functional.scaled_dot_product_attention`` with q, k, v of
        shape (B, heads, N, D).
    bindings:
        Values of the graph's size symbols (a graph compiled with dynamic shapes): every shape is
        read under them, so one symbolic graph gives the layout of each concrete call.

    Returns
    -------
    VideoLayout whose ``seq_len`` equals N, or a reason for a person (a str; a ``PartialGraph``
    when the graph holds no video grid at all).
    """
    with bound(bindings):
        return _infer_site_layout(gm, sdpa_node)


def _infer_site_layout(gm: torch.fx.GraphModule, sdpa_node: torch.fx.Node) -> VideoLayout | str:
    if sdpa_node.target not in SDPA_TARGETS:
        return f"node {sdpa_node.name} is not a call of scaled_dot_product_attention"
    query, key = _qk(sdpa_node)
    if query is None or key is None:
        return f"cannot read query and key of {sdpa_node.name}"
    q_shape, k_shape = _shape(query), _shape(key)
    if q_shape is None or k_shape is None or len(q_shape) < 2 or len(k_shape) < 2:
        return "query or key of this attention has no known tensor shape in the graph"
    seq, kv_seq = q_shape[-2], k_shape[-2]
    if seq is None or kv_seq is None:
        return (
            f"sequence length {example(query).shape[-2]} is not known before the call (a data-dependent "
            f"size); {LAYOUT_HINT}"
        )
    if seq != kv_seq:
        return f"cross-attention: query length {seq} != key length {kv_seq}"

    facts = _facts(gm, holding=(query, key))
    spans = _merge_dims(_dim(facts.dims[query], -2), _dim(facts.dims[key], -2))
    spans = spans or ((seq, None),)
    reason = _shard_reason(spans, seq)
    if reason:
        return reason
    conflicts = [info for _, info in spans if isinstance(info, _Conflict)]
    if conflicts:
        return f"ambiguous: {conflicts[0].what} both fit the {seq} tokens of the query; {LAYOUT_HINT}"
    grids = [(i, info) for i, (_, info) in enumerate(spans) if info is not None]
    if not grids:
        return _no_grid_reason(facts, (query, key), seq)
    videos = [(i, info) for i, info in grids if len(info) == 3]
    if not videos:  # an image (or a single latent frame): a height x width grid is one frame
        videos = [(i, (1, *info)) for i, info in grids if len(info) == 2]
    if len(videos) > 1:
        # Several grids (HunyuanVideo-Framepack: downsampled history clips before the current window):
        # the largest is the video being generated; the others are attended densely, like text.
        sizes = sorted((math.prod(info) for _, info in videos), reverse=True)
        if sizes[0] == sizes[1]:
            found = ", ".join("x".join(map(str, info)) for _, info in videos)
            return f"ambiguous: {len(videos)} equally large video grids ({found}) in {seq} tokens; {LAYOUT_HINT}"
        videos = [max(videos, key=lambda item: math.prod(item[1]))]
    if not videos:
        found = ", ".join("x".join(map(str, info)) for _, info in grids)
        return (
            f"not a video sequence: its tokens are a flattened {found} grid, not [frames x] height x width; "
            f"if it is video, {LAYOUT_HINT}"
        )
    index, (frames, height, width) = videos[0]
    prefix = sum(length for length, _ in spans[:index])
    suffix = sum(length for length, _ in spans[index + 1 :])
    layout = VideoLayout(frames, height, width, prefix, suffix)
    if layout.seq_len != seq:
        return (
            f"sequence length {seq} does not match video grid {frames}x{height}x{width}="
            f"{layout.video_tokens} plus {prefix + suffix} text"
        )
    if 2 * layout.video_tokens <= seq:
        # Every video DiT's sequence is mostly video; a small grid (a downsampled history clip) among many
        # other tokens means the video's own grid was not followed here: do not guess.
        return (
            f"the only video grid found, {frames}x{height}x{width}, holds {layout.video_tokens} of the {seq} tokens "
            f"(not most of them), so it is not taken as the video; {LAYOUT_HINT}"
        )
    log.debug("site %s: layout %s", sdpa_node.name, layout.describe())
    return layout


SHARD_HINT = "RainFusion needs the whole sequence of a head on one rank (Ulysses: ulysses_degree > 1, ring_degree 1)"


def _shard_reason(spans: Sequence[tuple[int, _Info]], seq: int) -> str | None:
    """Why a sequence made of shards cannot have a VideoLayout (None if it holds no shard)."""
    for _, info in spans:
        if isinstance(info, _Piece):
            return (
                f"sequence-sharded attention: the {seq} query tokens are 1 of {info.parts} chunks of the sequence "
                f"(context-parallel ring attention, or a shard not gathered by an all-to-all); {SHARD_HINT}"
            )
        if isinstance(info, (_Sharded, _Ranks)):
            what = info.what if isinstance(info, _Sharded) else "an all-to-all's rank dimension"
            return (
                f"sequence shards that no VideoLayout describes ({what}); the Ulysses all-to-all keeps each rank's "
                "token order, so shard a joint video+text sequence such that the gathered order is text, video, text "
                "(not the video of one rank, its text, the next rank's video...), or keep it dense"
            )
    return None


def sequence_shard_reason(gm: torch.fx.GraphModule, sdpa_node: torch.fx.Node) -> str | None:
    """Why ``sdpa_node`` attends over a shard of a sequence (None if it does not, or cannot tell).

    For graphs with collectives (context parallelism): such a site must stay dense even when a
    ``layout`` option was given, because its tokens are not the layout's sequence.
    """
    query, key = _qk(sdpa_node)
    if query is None or key is None or _shape(query) is None or _shape(key) is None:
        return None
    facts = _facts(gm, holding=(query, key))
    for node in (query, key):
        reason = _shard_reason(_dim(facts.dims[node], -2) or (), _shape(node)[-2])
        if reason:
            return reason
    return None


def _qk(node: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    args = sdpa_arguments(node)
    return _as_node(args["query"]), _as_node(args["key"])


def _as_node(value: Any) -> torch.fx.Node | None:
    return value if isinstance(value, torch.fx.Node) else None


def _no_grid_reason(facts: _GraphFacts, nodes: Iterable[torch.fx.Node], seq: int) -> str:
    """Why no token of this site traces back to a flattened grid."""
    ancestors: set[torch.fx.Node] = set()
    for node in nodes:
        ancestors |= nx.ancestors(facts.digraph, node)
    inputs = sorted(n.name for n in ancestors if n.op == "placeholder" and seq in (_shape(n) or ()))
    source = f"they enter the graph already flattened, through {', '.join(inputs)}" if inputs else "none"
    if facts.has_video_grid:
        return (
            f"not a video sequence: none of its {seq} query tokens comes from the video grid of this graph ({source})"
        )
    return PartialGraph(
        f"no 5-D video tensor is flattened into tokens in this graph ({seq} query tokens: {source}): the graph "
        f"holds only part of the model (regional compilation, or a graph break before the patch embedding); "
        f"compile the whole model or {LAYOUT_HINT}"
    )


# -- per-node propagation ----------------------------------------------------------------------


def _propagate_dims(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, _Tensor]:
    """For every node, what each dimension of its output is (forward over the graph, once)."""
    dims: dict[torch.fx.Node, _Tensor] = {}
    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op not in ("call_function", "call_method", "call_module") or shape is None:
            dims[node] = None
            continue
        try:
            result = _node_dims(node, shape, dims)
        except (TypeError, ValueError, IndexError, RuntimeError) as error:  # an op form we do not read
            log.debug("layout inference skips %s (%s): %s", node.name, node.target, error)
            result = None
        dims[node] = result if result is not None and any(d is not None for d in result) else None
    return dims


def _node_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, _Tensor]) -> _Tensor:
    name = _op_name(node)
    source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if node.target is operator.getitem and source is not None:
        if isinstance(example(source), (tuple, list)):
            return _split_item_dims(source, node.args[1], shape, dims)
        return _getitem_dims(source, node.args[1], shape, dims)
    if name in _CAT_OPS:
        return _cat_dims(node, shape, dims)
    if name == "stack":
        return _stack_dims(node, shape, dims)
    if source is not None and _shape(source) is not None:
        if name in _VIEW_OPS and (exchanged := _exchange_dims(source, shape, dims)) is not None:
            return exchanged
        if name in _VIEW_OPS:  # where grids are born: even from a tensor with no known dimension
            tensor = dims.get(source) or (None,) * len(_shape(source))
            return _view_dims(tensor, _shape(source), shape)
        if name in _PERMUTE_OPS:
            return _permute_dims(node, dims[source], _shape(source)) if dims.get(source) else None
    return _broadcast_dims(node, shape, dims)


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", "").split(".")[0]  # aten/c10d overloads: "name.default"


def _shape(node: torch.fx.Node) -> tuple[int | None, ...] | None:
    """Static shape of a tensor node; symbolic sizes are None. None for non-tensors."""
    value = example(node)
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(size_value(size) for size in value.shape)


def _dim(tensor: _Tensor, index: int) -> _Dim:
    if tensor is None or not -len(tensor) <= index < len(tensor):
        return None
    return tensor[index]


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _shape(n) is not None else None)
    return found


def _broadcast_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, _Tensor]) -> _Tensor:
    """Elementwise, linear, norms, SDPA, ...: a dimension follows the inputs' dimension of equal size, from the end."""
    inputs = [(n, _shape(n)) for n in _tensor_inputs(node) if dims.get(n) is not None]
    if not inputs:
        return None
    out = []
    for d, size in enumerate(shape):
        back = d - len(shape)
        merged: _Dim = None
        if size not in (None, 1):
            for n, in_shape in inputs:
                if len(in_shape) >= -back and in_shape[back] == size:
                    merged = _merge_dims(merged, dims[n][back])
        out.append(merged)
    return tuple(out)


def _view_dims(tensor: _Tensor, in_shape: tuple, out_shape: tuple) -> _Tensor:
    """view / reshape / flatten / unflatten: group dimensions by equal products; merges become grids."""
    if None in in_shape or None in out_shape:
        return None
    groups = _align(in_shape, out_shape)
    if groups is None:
        return None
    out: list[_Dim] = [None] * len(out_shape)
    for in_dims, out_dims in groups:
        if len(in_dims) == 1 and len(out_dims) == 1:
            out[out_dims[0]] = tensor[in_dims[0]]
            continue
        if not in_dims or not out_dims:
            continue
        infos = [_whole(tensor[i], in_shape[i]) for i in in_dims]
        if len(in_dims) == 2 and len(out_dims) == 1 and isinstance(infos[0], _Ranks):
            out[out_dims[0]] = _gather_pieces(infos[0], tensor[in_dims[1]], in_shape[in_dims[1]])
            continue
        conflict = next((info for info in infos if isinstance(info, _Conflict)), None)
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
                sub = _sub_factors(factors, before, size)
                out[o] = ((size, sub),) if sub is not None and len(sub) >= 2 else None
            before *= size
    return tuple(out)


def _gather_pieces(ranks: _Ranks, dim: _Dim, size: int) -> _Dim:
    """flatten(ranks, tokens) after an all-to-all: each rank's piece, in rank order, is the whole sequence."""
    piece = _whole(dim, size)
    if isinstance(piece, _Piece) and piece.parts == ranks.parts:
        return piece.whole
    if dim is not None and any(isinstance(info, _Piece) for _, info in dim):
        what = ", ".join(f"{info.parts}-way shard" if isinstance(info, _Piece) else "other tokens" for _, info in dim)
        return (
            (
                ranks.parts * size,
                _Sharded(
                    f"each rank's {size} tokens are [{what}]: after the all-to-all the "
                    f"shards of {ranks.parts} ranks are interleaved"
                ),
            ),
        )
    return None


def _whole(dim: _Dim, size: int) -> _Info:
    """The info of a dimension that is a single span, else None."""
    if dim is None or len(dim) != 1 or dim[0][0] != size:
        return None
    return dim[0][1]


def _sub_factors(factors: Sequence[int], before: int, size: int) -> tuple[int, ...] | None:
    """The run of ``factors`` whose product is ``size`` after a run whose product is ``before``."""
    product, start = 1, 0
    while product < before and start < len(factors):
        product *= factors[start]
        start += 1
    if product != before:
        return None
    product, stop = 1, start
    while product < size and stop < len(factors):
        product *= factors[stop]
        stop += 1
    return tuple(factors[start:stop]) if product == size else None


def _align(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of dimensions of ``a`` and ``b`` with equal products (size-1 dimensions alone)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and j < len(b) and a[i] == b[j]:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
        elif i < len(a) and a[i] == 1:
            groups.append(([i], []))
            i += 1
        elif j < len(b) and b[j] == 1:
            groups.append(([], [j]))
            j += 1
        elif i < len(a) and j < len(b):
            in_dims, out_dims, pa, pb = [i], [j], a[i], b[j]
            while pa != pb:
                if pa < pb:
                    i += 1
                    if i >= len(a):
                        return None
                    in_dims.append(i)
                    pa *= a[i]
                else:
                    j += 1
                    if j >= len(b):
                        return None
                    out_dims.append(j)
                    pb *= b[j]
            groups.append((in_dims, out_dims))
            i, j = i + 1, j + 1
        else:
            return None
    return groups


def _permute_dims(node: torch.fx.Node, tensor: _Tensor, in_shape: tuple) -> _Tensor:
    """permute / transpose / movedim: replay the op on a meta tensor whose sizes name the dims."""
    primes = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if len(in_shape) > len(primes):
        return None
    probe = torch.empty(primes[: len(in_shape)], device="meta")
    op = getattr(probe, node.target) if node.op == "call_method" else functools.partial(node.target, probe)
    result = op(*node.args[1:], **node.kwargs)
    return tuple(tensor[primes.index(size)] for size in result.shape)


def _getitem_dims(source: torch.fx.Node, index: Any, shape: tuple, dims: dict[torch.fx.Node, _Tensor]) -> _Tensor:
    """Basic indexing (slices, ints, None, Ellipsis): slices cut spans; tensor indices end the trace."""
    tensor, in_shape = dims.get(source), _shape(source)
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
    out: list[_Dim] = []
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
                out.append(_slice_dim(tensor[d], start, max(start, stop)))
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


def _split_item_dims(source: torch.fx.Node, index: Any, shape: tuple, dims: dict[torch.fx.Node, _Tensor]) -> _Tensor:
    """``chunk(...)[i]`` and friends: the i-th piece along the split dimension."""
    name = _op_name(source)
    base = source.args[0] if source.args and isinstance(source.args[0], torch.fx.Node) else None
    if name not in _SPLIT_OPS or base is None or dims.get(base) is None or not isinstance(index, int):
        return None
    tensor, in_shape = dims[base], _shape(base)
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
    cut = _slice_dim(tensor[dim], start, start + shape[dim])
    lengths = {size_value(piece.shape[dim]) for piece in pieces}
    if cut is None and _has_grid(tensor[dim]) and len(lengths) == 1 and None not in lengths and len(pieces) > 1:
        # An equal chunk that cuts a grid (a sequence shard): keep what it is a piece of, so that an
        # all-to-all that puts the pieces back together (Ulysses) gives the whole sequence again.
        cut = ((shape[dim], _Piece(tensor[dim], len(pieces))),)
    return tuple(cut if i == dim else d for i, d in enumerate(tensor))


def _has_grid(dim: _Dim) -> bool:
    return dim is not None and any(isinstance(info, (tuple, _Piece)) for _, info in dim)


def _exchange_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, _Tensor]) -> _Tensor:
    """``reshape(wait(all_to_all_single(flatten(t))), t.shape)``: the all-to-all of Ulysses attention.

    ``t`` is (n, ...) with n the group size: slice j goes to rank j, and after the exchange slice j
    came from rank j. Dimension 0 becomes ``_Ranks(n)``; the others keep what they were (a
    ``_Piece`` of a sequence stays one: merged with the ranks by a later flatten, it is whole again).
    """
    while _op_name(node) in _WAIT_OPS and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if _op_name(node) not in _ALL_TO_ALL_OPS or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    flat = node.args[0]
    splits = [a for a in (*node.args[1:3], node.kwargs.get("output_split_sizes")) if isinstance(a, (list, tuple))]
    source = flat.args[0] if _op_name(flat) in _VIEW_OPS and flat.args else None
    if not isinstance(source, torch.fx.Node) or _shape(source) != shape or not shape or shape[0] is None:
        return None
    parts = len(splits[0]) if splits else shape[0]
    if parts != shape[0] or any(len(set(s)) != 1 for s in splits):
        return None  # uneven splits (Ulysses "anything"): not a plain exchange
    tensor = dims.get(source) or (None,) * len(shape)
    return (((parts, _Ranks(parts)),), *tensor[1:])


def _cat_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, _Tensor]) -> _Tensor:
    """cat: spans of the pieces follow each other along the cat dimension; other dims merge."""
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    pieces = [p for p in pieces if isinstance(p, torch.fx.Node) and _shape(p) not in (None, (0,))]
    if not pieces or any(len(_shape(p)) != len(shape) for p in pieces):
        return None
    dim %= len(shape)
    out: list[_Dim] = []
    for d, size in enumerate(shape):
        if d == dim:
            lengths = [_shape(p)[d] for p in pieces]
            if size is None or None in lengths:
                out.append(None)
                continue
            spans: list[tuple[int, _Info]] = []
            for p, length in zip(pieces, lengths, strict=True):
                spans.extend(_dim(dims.get(p), d) or ((length, None),))
            out.append(_normalize(spans))
        else:
            merged: _Dim = None
            for p in pieces:
                merged = _merge_dims(merged, _dim(dims.get(p), d))
            out.append(merged)
    return tuple(out)


def _stack_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, _Tensor]) -> _Tensor:
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % len(shape)
    out: list[_Dim] = []
    for d in range(len(shape)):
        merged: _Dim = None
        if d != dim:
            for p in pieces:
                if isinstance(p, torch.fx.Node):
                    merged = _merge_dims(merged, _dim(dims.get(p), d if d < dim else d - 1))
        out.append(merged)
    return tuple(out)


# -- spans ---------------------------------------------------------------------------------------


def _normalize(spans: Iterable[tuple[int, _Info]]) -> _Dim:
    """Join neighbouring unknown spans; a dimension with no grid at all is None."""
    out: list[tuple[int, _Info]] = []
    for length, info in spans:
        if length == 0:
            continue
        if info is None and out and out[-1][1] is None:
            out[-1] = (out[-1][0] + length, None)
        else:
            out.append((length, info))
    return tuple(out) if any(info is not None for _, info in out) else None


def _bounds(spans: tuple[tuple[int, _Info], ...]) -> list[int]:
    bounds = [0]
    for length, _ in spans:
        bounds.append(bounds[-1] + length)
    return bounds


def _slice_dim(dim: _Dim, start: int, stop: int) -> _Dim:
    """Spans of ``dim[start:stop]``; a grid cut in part is no longer a grid."""
    if dim is None:
        return None
    out = []
    for (length, info), lo in zip(dim, _bounds(dim)[:-1], strict=True):
        a, b = max(lo, start), min(lo + length, stop)
        if a < b:
            out.append((b - a, info if (a, b) == (lo, lo + length) else None))
    return _normalize(out)


def _merge_dims(a: _Dim, b: _Dim) -> _Dim:
    """What two views of the same dimension say together (finer grid wins; different grids conflict)."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    cuts = sorted(set(_bounds(a)) | set(_bounds(b)))
    pieces = []
    for lo, hi in itertools.pairwise(cuts):
        first, second = _span_at(a, lo, hi), _span_at(b, lo, hi)
        pieces.append((hi - lo, _merge_info(first, second)))
    return _normalize(pieces)


def _span_at(dim: tuple[tuple[int, _Info], ...], lo: int, hi: int) -> _Info:
    for (length, info), start in zip(dim, _bounds(dim)[:-1], strict=True):
        if start <= lo and hi <= start + length:
            return info if (lo, hi) == (start, start + length) else None
    return None


def _merge_info(a: _Info, b: _Info) -> _Info:
    if a is None or a == b or isinstance(a, _Conflict):
        return b if a is None else a
    if b is None or isinstance(b, _Conflict):
        return a if b is None else b
    if not (isinstance(a, tuple) and isinstance(b, tuple)):
        return _Conflict(f"{_describe(a)} and {_describe(b)}")
    if _refines(a, b):
        return a
    if _refines(b, a):
        return b
    return _Conflict(f"grids {'x'.join(map(str, a))} and {'x'.join(map(str, b))}")


def _describe(info: _Info) -> str:
    if isinstance(info, tuple):
        return "grid " + "x".join(map(str, info))
    if isinstance(info, _Piece):
        return f"a {info.parts}-way sequence shard"
    return "sequence shards" if isinstance(info, _Sharded) else "an all-to-all rank dimension"


def _refines(fine: tuple[int, ...], coarse: tuple[int, ...]) -> bool:
    """Whether grouping neighbours of ``fine`` gives ``coarse``."""
    i = 0
    for size in coarse:
        product = 1
        while product < size and i < len(fine):
            product *= fine[i]
            i += 1
        if product != size:
            return False
    return i == len(fine) and math.prod(fine) == math.prod(coarse)
