"""Give each eligible site its VideoLayout (or the way to find it per call) and what computes it.

- the user's ``layout`` option, else ``infer_layout`` over this graph;
- a graph with symbolic sizes keeps a snapshot of itself: each new call shape reads the graph again
  under the call's sizes (``bindings``), so one compile serves every resolution;
- a graph with no video grid at all (regional compilation) takes the layout from one trace of the
  model that calls it, on the first call (``parent_trace``).
Sites where sparsity does not apply or does not pay stay dense, with the reason: static ones from their one
shape; symbolic ones only under a guard on their length (``length_guard``), for the compile-time example
must not decide for every length the graph serves.
"""

from __future__ import annotations

import sympy
import torch

from rf_compile.config import OptionError, RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.ops import cost
from rf_compile.ops.executors import choose_kernel
from rf_compile.ops.runtime.call_stack import calling_frame_arguments
from rf_compile.ops.runtime.sites import LayoutResolver
from rf_compile.passes.context import PassContext, Site
from rf_compile.passes.infer_layout import PartialGraph, infer_site_layout
from rf_compile.passes.length_guard import short_site_reason
from rf_compile.passes.nodes import example
from rf_compile.passes.parent_trace import RecordedGraph, layout_from_calling_model
from rf_compile.passes.symbols import graph_symbols, hint_bindings


def assign_layouts(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    config = ctx.config
    candidates = [site for site in ctx.sites if site.eligible]
    hints: dict[sympy.Symbol, int] = {}
    if any(site.report.symbolic for site in candidates):
        ctx.symbols = graph_symbols(gm)
        hints = hint_bindings(gm, ctx.symbols)
    snapshot: _Snapshot | None = None
    for site in candidates:
        kernel, reason = choose_kernel(config.kernel, *_kernel_inputs(site), config.precision)
        if not kernel:
            site.make_dense(reason)
            continue
        site.report.kernel = kernel
        guarded = site.report.symbolic and config.layout is None  # (the layout option fixes the length)
        reason = short_site_reason(config, _kernel_inputs(site)[0], kernel) if guarded else None
        if reason:  # too short at any layout for every length this graph serves: SDPA stays in the graph
            site.make_dense(reason)
            continue
        if config.layout is not None:
            _use_layout_option(site, config)
            continue
        layout = infer_site_layout(gm, site.node, hints)
        seq_symbols = _free_symbols(example(site.args["query"]).shape[2])
        if isinstance(layout, PartialGraph):
            site.report.layout_source = "calling model (traced on the first call of each shape)"
            static = not site.report.symbolic
            reason = cost.shape_dense_reason(config, _kernel_inputs(site)[0], kernel) if static else None
            if reason:  # too short to pay at any layout: SDPA stays in the graph
                site.make_dense(reason)
            else:
                site.resolver = _calling_model_resolver(config)
            continue
        if site.report.symbolic and (not isinstance(layout, str) or not seq_symbols <= hints.keys()):
            snapshot = snapshot or _Snapshot(gm)
            site.resolver = snapshot.resolver(site.node, config)
        if isinstance(layout, str):
            if site.resolver is None:
                site.make_dense(layout)
            else:  # a data-dependent length: the layout is read at the first call of each shape
                site.report.layout_source = "graph, at the first call of each shape (data-dependent size)"
            continue
        site.report.layout = layout
        site.report.layout_source = "graph, per call shape" if site.resolver else "graph"
        if site.resolver is None:  # static shapes: the one call shape is judged now (symbolic: by the op per call)
            q = _kernel_inputs(site)[0]
            reason = layout_dense_reason(layout, config) or cost.dense_reason(config, layout, q, kernel)
            if reason:
                site.make_dense(reason)
    if config.layout is not None and candidates and not any(s.report.layout or s.resolver for s in candidates):
        lengths = sorted({s.report.seq_len for s in candidates}, key=str)
        raise OptionError(
            f"layout option {config.layout.describe()} ({config.layout.seq_len} tokens) matches no "
            f"self-attention site; their sequence lengths are {lengths}"
        )


def layout_dense_reason(layout: VideoLayout, config: RainFusionConfig) -> str | None:
    """Why a site with this layout stays dense under ``config`` (None if it runs sparse)."""
    if layout.frames == 1 and config.mode in ("v1", "v1+"):
        return "single-frame (image) grid: the v1 head patterns need frames; mode='v2' makes it sparse"
    if layout.video_tokens < config.min_video_tokens:
        return f"{layout.video_tokens} video tokens < min_video_tokens={config.min_video_tokens}"
    return None


def _checked(layout: VideoLayout | str, config: RainFusionConfig) -> VideoLayout | str:
    if isinstance(layout, str):
        return layout
    return layout_dense_reason(layout, config) or layout


def _kernel_inputs(site: Site) -> tuple:
    """q, k and the key mask the kernel would see (an outer-product mask is passed as its key factor)."""
    mask = None if site.mask_factors else example(site.args["attn_mask"])
    return example(site.args["query"]), example(site.args["key"]), mask


def _free_symbols(size) -> set:
    return set(size.node.expr.free_symbols) if isinstance(size, torch.SymInt) else set()


def _use_layout_option(site: Site, config: RainFusionConfig) -> None:
    layout = config.layout
    site.report.layout_source = "option"
    if site.report.symbolic:  # the length is known per call: check it there

        def resolve(bindings: dict, model, seq_len: int) -> VideoLayout | str:
            if seq_len != layout.seq_len:
                return f"sequence length {seq_len} does not match the layout option ({layout.describe()})"
            return _checked(layout, config)

        site.resolver = resolve
    elif layout.seq_len != site.report.seq_len:
        site.make_dense(f"sequence length {site.report.seq_len} does not match the layout option ({layout.describe()})")
        return
    site.report.layout = layout
    reason = layout_dense_reason(layout, config)
    if reason:
        site.make_dense(reason)


def _calling_model_resolver(config: RainFusionConfig) -> LayoutResolver:
    def resolve(bindings: dict, model: torch.nn.Module | None, seq_len: int) -> VideoLayout | str:
        call = calling_frame_arguments(model) if model is not None else None
        return _checked(layout_from_calling_model(model, call, seq_len), config)

    return resolve


class _Snapshot:
    """A copy of the graph as the passes saw it (inductor may change ``gm`` later), for run-time reads."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        graph = torch.fx.Graph()
        self.copies: dict[torch.fx.Node, torch.fx.Node] = {}
        graph.graph_copy(gm.graph, self.copies)
        self.graph = RecordedGraph(graph)

    def resolver(self, node: torch.fx.Node, config: RainFusionConfig) -> LayoutResolver:
        copy = self.copies[node]

        def resolve(bindings: dict, model, seq_len: int) -> VideoLayout | str:
            return _checked(infer_site_layout(self.graph, copy, bindings), config)

        return resolve
