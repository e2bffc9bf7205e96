"""Infer the video layout of an attention site from the Dynamo graph alone.

The token dimension of a video DiT's attention is built in the graph: a 5-D latent is patch
embedded (conv, or a reshape to patches and a Linear), its frames x height x width grid is
folded into one dimension by ``flatten`` / ``view`` / ``reshape`` (frame-major), and text tokens
are joined to it by ``torch.cat``. This module follows every tensor dimension forward through the
graph once and records, per dimension, which spans are a flattened grid and of what factors
(``(3, 4, 6)`` for 3 frames of 4x6 tokens) and which spans are something else (text). At an SDPA
node the query's (and key's) sequence dimension then reads as ``prefix + grid + suffix``.

What it uses: shapes of ``node.meta["example_value"]`` (fake tensors; symbolic sizes are read under
the bindings of ``symbols.bound``), the per-op rules of ``dim_rules`` (view-like, permute-like,
indexing, ``cat`` / ``stack`` / ``chunk``, broadcasting for everything else) over the span algebra
of ``spans``, and ``sequence_shards`` for context parallelism.
What it never uses: module, parameter or class names. It is not the place to decide whether a site
should be sparse (cross-attention, masks, head dims are for the other passes); it only answers
"which tokens are video, and on what grid", or says in words why it cannot.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import weakref
from collections.abc import Iterable
from typing import Any

import sympy
import torch
import torch.fx

from rf_compile.bounded import remember
from rf_compile.layout import VideoLayout
from rf_compile.passes.dim_rules import propagate_dims
from rf_compile.passes.nodes import SDPA_TARGETS, example, sdpa_arguments
from rf_compile.passes.sequence_shards import shard_layout
from rf_compile.passes.spans import Conflict, TensorDims, dim_at, merge_dims
from rf_compile.passes.symbols import _BINDINGS, bound, shape_of

log = logging.getLogger(__name__)

LAYOUT_HINT = "pass options={'layout': (frames, height, width, prefix, suffix)}"


class PartialGraph(str):
    """The reason a site has no layout when its graph holds no video grid at all: the graph is part
    of a model (regional compilation, a graph break before the patch embedding). The layout can then
    come from the calling model's computation (``passes.parent_trace``)."""


@dataclasses.dataclass
class GraphDims:
    """What every dimension of every node of a graph is, under one set of bindings."""

    num_nodes: int
    dims: dict[torch.fx.Node, TensorDims]

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


# Per graph, per bindings: its dims (one propagation serves every site of the graph).
_DIMS: weakref.WeakKeyDictionary[Any, dict[tuple, GraphDims]] = weakref.WeakKeyDictionary()


def graph_dims(gm: Any, holding: Iterable[torch.fx.Node] = ()) -> GraphDims:
    """The cached dims of ``gm`` (anything with a ``.graph``) under the current bindings, recomputed if
    the graph changed (node count, or a node of ``holding`` unknown)."""
    per_bindings = _DIMS.setdefault(gm, {})
    key = tuple(sorted((str(symbol), int(value)) for symbol, value in (_BINDINGS.get() or {}).items()))
    found = per_bindings.get(key)
    if found is None or found.num_nodes != len(gm.graph.nodes) or any(n not in found.dims for n in holding):
        # One entry per call shape met at run time: keep the newest few.
        found = remember(per_bindings, key, GraphDims(len(gm.graph.nodes), propagate_dims(gm)), 16)
    return found


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
    q_shape, k_shape = shape_of(query), shape_of(key)
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

    facts = graph_dims(gm, holding=(query, key))
    spans = merge_dims(dim_at(facts.dims[query], -2), dim_at(facts.dims[key], -2))
    spans = spans or ((seq, None),)
    sharded = shard_layout(spans, seq)
    if sharded is not None:
        return sharded if isinstance(sharded, str) else _mostly_video(sharded, sdpa_node)
    conflicts = [info for _, info in spans if isinstance(info, Conflict)]
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
    return _mostly_video(layout, sdpa_node)


def _mostly_video(layout: VideoLayout, sdpa_node: torch.fx.Node) -> VideoLayout | str:
    """``layout``, unless its grid holds at most half of the tokens.

    Every video DiT's sequence is mostly video; a small grid (a downsampled history clip) among many
    other tokens means the video's own grid was not followed here: do not guess.
    """
    if 2 * layout.video_tokens <= layout.seq_len:
        return (
            f"the only video grid found, {layout.frames}x{layout.height}x{layout.width}, holds {layout.video_tokens} "
            f"of the {layout.seq_len} tokens (not most of them), so it is not taken as the video; {LAYOUT_HINT}"
        )
    log.debug("site %s: layout %s", sdpa_node.name, layout.describe())
    return layout


def sequence_shard_reason(
    gm: torch.fx.GraphModule, sdpa_node: torch.fx.Node, option: VideoLayout | None = None
) -> str | None:
    """Why ``sdpa_node`` attends over a shard of a sequence (None if it does not, or cannot tell).

    For graphs with collectives (context parallelism): such a site must stay dense even when a
    ``layout`` option was given, because its tokens are not the layout's sequence; so must a site
    whose tokens lie in rank shards that the ``option`` does not give.
    """
    query, key = _qk(sdpa_node)
    if query is None or key is None or shape_of(query) is None or shape_of(key) is None:
        return None
    facts = graph_dims(gm, holding=(query, key))
    for node in (query, key):
        found = shard_layout(dim_at(facts.dims[node], -2) or (), shape_of(node)[-2])
        if isinstance(found, str):
            return found
        if found is not None and option is not None and option.shards != found.shards:
            return (
                f"the sequence lies in {found.shards} interleaved rank shards (Ulysses over per-rank [video, text] "
                f"shards) but the layout option has shards={option.shards}: give shards={found.shards} in the "
                "option, or leave the layout to inference"
            )
    return None


def _qk(node: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    args = sdpa_arguments(node)
    return _as_node(args["query"]), _as_node(args["key"])


def _as_node(value: Any) -> torch.fx.Node | None:
    return value if isinstance(value, torch.fx.Node) else None


def _ancestors(nodes: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    """Every node the given nodes are computed from."""
    seen: set[torch.fx.Node] = set()
    stack = list(nodes)
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _no_grid_reason(facts: GraphDims, nodes: Iterable[torch.fx.Node], seq: int) -> str:
    """Why no token of this site traces back to a flattened grid."""
    inputs = sorted(n.name for n in _ancestors(nodes) if n.op == "placeholder" and seq in (shape_of(n) or ()))
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
