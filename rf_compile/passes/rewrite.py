"""Replace each eligible SDPA node by ``torch.ops.rainfusion.attention``."""

from __future__ import annotations

import logging
import operator
import re

import torch
from torch._dynamo.utils import counters

from rf_compile.ops.attention import attention, output_like  # noqa: F401  (registers the op)
from rf_compile.ops.runtime.sites import register_site
from rf_compile.passes.context import PassContext, Site
from rf_compile.passes.nodes import example, is_impure, without_hooks
from rf_compile.passes.symbols import symbol_readers

log = logging.getLogger(__name__)

_TIMESTEP_NAME = re.compile(r"(^|_)timesteps?(_|$)", re.IGNORECASE)
_ALL = slice(None)


def rewrite_sites(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    """Rewrite every site with a layout (or a resolver); count sparse and dense sites."""
    timestep, owner = find_timestep(gm), find_owner(gm)
    owner_path = parameter_path(owner) if owner is not None else ""
    readers: dict = {}
    changed = False
    for site in ctx.sites:
        if not site.eligible or (site.report.layout is None and site.resolver is None):
            site.report.status = "dense"
            counters["rainfusion"]["dense_sites"] += 1
            continue
        symbols, sizes = symbol_readers(gm, ctx.symbols, site.node, readers) if site.resolver else ((), [])
        key = site.report.key = register_site(
            site.report.name, site.report.layout, ctx.config, site.resolver, site.report.layout_source, symbols,
            owner_path,
        )
        args = site.args
        key_mask, row_mask = _mask_inputs(gm, site)
        with gm.graph.inserting_before(site.node):
            new = gm.graph.call_function(
                torch.ops.rainfusion.attention.default,
                (args["query"], args["key"], args["value"], key_mask, row_mask, timestep, owner, args["scale"], key,
                 sizes),
            )  # fmt: skip
        new.meta = dict(site.node.meta)
        q = example(args["query"])
        new.meta["example_value"] = output_like(q) if isinstance(q, torch.Tensor) else None
        site.node.replace_all_uses_with(new)
        gm.graph.erase_node(site.node)
        site.node = new
        if ctx.config.mode == "dense":
            site.report.status, site.report.reason = "dense", "mode='dense' (rewritten, computes dense SDPA)"
        else:
            site.report.status = "sparse"
        counters["rainfusion"]["sparse_sites"] += 1
        changed = True
    if changed:
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        gm.graph.lint()
        gm.recompile()
    log.debug("rainfusion: rewrote %d of %d sites", sum(s.report.status == "sparse" for s in ctx.sites), len(ctx.sites))


def _mask_inputs(gm: torch.fx.GraphModule, site: Site) -> tuple:
    """(key mask, row mask) for the op: the SDPA mask itself, or the two factors of an outer product."""
    if site.mask_factors is None:
        return site.args["attn_mask"], None
    row, key = site.mask_factors
    sliced = []
    for node, index in ((key, (_ALL, _ALL, slice(0, 1), _ALL)), (row, (_ALL, _ALL, _ALL, slice(0, 1)))):
        with gm.graph.inserting_before(site.node):
            part = gm.graph.call_function(operator.getitem, (node, index))
        part.meta["example_value"] = example(node)[index]
        sliced.append(part)
    return tuple(sliced)


def find_timestep(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The graph input holding the model's denoising timestep, if any (diffusers names it ``timestep``)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = example(node)
        if _TIMESTEP_NAME.search(node.name.strip("_")) and isinstance(value, torch.Tensor) and value.numel() >= 1:
            return node
    return None


def find_owner(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """A parameter input of the graph: at run time it tells which model instance is calling.

    Dynamo passes parameters as graph inputs (inlined nn.Modules), so one compiled graph can
    serve two models of one class; their sites must still keep apart. None when the graph has
    no parameter input (the graph is then specialised to one model anyway).
    """
    for node in gm.graph.find_nodes(op="placeholder"):
        if isinstance(example(node), torch.nn.Parameter):
            return node
    return None


def parameter_path(node: torch.fx.Node) -> str:
    """Dotted path of a parameter input from the graph's root module (``attn1.to_q.weight``), from
    Dynamo's record of where the input came from; "" if there is none."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return ""
    name = source.name if isinstance(source.name, str) else source.name()  # a property in newer torch
    path = re.sub(r"^L\['[^']+'\]\.?", "", name)
    path = re.sub(r"\.?_(modules|parameters|buffers)\['([^']+)'\]", r".\2", path)
    return without_hooks(path.strip("."))
