"""Replace each eligible SDPA node by ``torch.ops.rainfusion.attention``."""

from __future__ import annotations

import logging
import re

import torch
from torch._dynamo.utils import counters

from rf_compile.ops.attention import attention  # noqa: F401  (registers torch.ops.rainfusion)
from rf_compile.ops.runtime import register_site
from rf_compile.passes.context import PassContext
from rf_compile.passes.find_attention import example

log = logging.getLogger(__name__)

_TIMESTEP_NAME = re.compile(r"(^|_)timesteps?(_|$)", re.IGNORECASE)


def rewrite_sites(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    """Rewrite every site with a layout; count sparse and dense sites."""
    timestep = find_timestep(gm)
    changed = False
    for site in ctx.sites:
        if not site.eligible or site.report.layout is None:
            site.report.status = "dense"
            counters["rainfusion"]["dense_sites"] += 1
            continue
        args = site.args
        key = site.report.key = register_site(site.report.name, site.report.layout, ctx.config)
        with gm.graph.inserting_before(site.node):
            new = gm.graph.call_function(
                torch.ops.rainfusion.attention.default,
                (args["query"], args["key"], args["value"], args["attn_mask"], timestep, args["scale"], key),
            )
        new.meta = dict(site.node.meta)
        new.meta["example_value"] = _fake_output(args)
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
        gm.graph.lint()
        gm.recompile()
    log.debug("rainfusion: rewrote %d of %d sites", sum(s.report.kernel is not None for s in ctx.sites), len(ctx.sites))


def find_timestep(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The graph input holding the model's denoising timestep, if any (diffusers names it ``timestep``)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = example(node)
        if _TIMESTEP_NAME.search(node.name.strip("_")) and isinstance(value, torch.Tensor) and value.numel() >= 1:
            return node
    return None


def _fake_output(args: dict) -> torch.Tensor | None:
    q = example(args["query"])
    if not isinstance(q, torch.Tensor):
        return None
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2)
