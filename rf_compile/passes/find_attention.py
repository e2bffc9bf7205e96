"""Find every scaled_dot_product_attention call in a Dynamo graph and check it can be sparse.

Eligibility gives reasons, not booleans: a site that cannot run RainFusion keeps SDPA and its
report says why (cross-attention, causal, dropout, a mask that is not key padding or an outer
product of it, grouped heads, ...). Symbolic sizes are fine: comparisons are made on the size
expressions, never by guessing values (and never by adding guards).
"""

from __future__ import annotations

import logging
import re

import torch

from rf_compile.layout import VideoLayout
from rf_compile.ops.masks import is_key_padding_mask
from rf_compile.passes.context import PassContext, Site
from rf_compile.passes.masks import outer_product_factors
from rf_compile.passes.nodes import example, is_sdpa, same_size, sdpa_arguments, without_hooks
from rf_compile.report import SiteReport

log = logging.getLogger(__name__)


def find_attention(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    """Record one ``Site`` per SDPA node, each with the first reason it must stay dense (if any)."""
    names: dict[str, int] = {}
    distributed = has_collectives(gm)
    for node in gm.graph.nodes:
        if not is_sdpa(node):
            continue
        args = sdpa_arguments(node)
        module = module_path(node)
        count = names.get(module, 0)
        names[module] = count + 1
        report = SiteReport(
            name=module if count == 0 else f"{module}#{count + 1}",
            module=module,
            source=source_line(node),
            graph=ctx.graph_index,
        )
        site = Site(node=node, args=args, report=report)
        _describe_shapes(site)
        reason = not_supported_reason(args)
        if reason is None:
            reason = _mask_reason(site)
        if not reason and distributed:
            reason = _sequence_shard_reason(gm, node, ctx.config.layout)
        if reason:
            site.make_dense(reason)
        ctx.sites.append(site)
    log.debug("rainfusion: found %d attention sites", len(ctx.sites))


def has_collectives(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph calls functional collectives (torch.distributed under torch.compile)."""
    return any(
        node.op == "call_function"
        and (
            str(node.target).startswith("_c10d_functional.")  # torch.ops._c10d_functional.* (packet or overload)
            or getattr(node.target, "__module__", "") == "torch.distributed._functional_collectives"
        )
        for node in gm.graph.nodes
    )


def _sequence_shard_reason(gm: torch.fx.GraphModule, node: torch.fx.Node, option: VideoLayout | None) -> str | None:
    """Context parallelism: a site over a shard of the sequence (ring attention) stays dense, layout option or not."""
    from rf_compile.passes.infer_layout import sequence_shard_reason

    try:
        return sequence_shard_reason(gm, node, option)
    except Exception as error:  # the check is advisory; inference reports its own failure later
        log.debug("rainfusion: shard check of %s failed: %s", node.name, error)
        return None


def _describe_shapes(site: Site) -> None:
    """Heads, head dim and lengths for the report (the compile-time example's, for symbolic sizes)."""
    q, k = example(site.args["query"]), example(site.args["key"])
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        site.report.heads, site.report.seq_len, site.report.head_dim = _hints(q.shape[1], q.shape[2], q.shape[3])
        site.report.symbolic = any(not isinstance(size, int) for size in q.shape)
    if isinstance(k, torch.Tensor) and k.dim() == 4:
        site.report.kv_len = _hints(k.shape[2])[0]


def _hints(*sizes) -> tuple:
    """Sizes as ints: symbolic ones by their example value (None for data-dependent sizes)."""
    out = []
    for size in sizes:
        if isinstance(size, int):
            out.append(size)
        else:
            hint = size.node.hint
            out.append(int(hint) if hint is not None else None)
    return tuple(out)


def _mask_reason(site: Site) -> str | None:
    """Key-padding masks run as they are; a square mask must be an outer product of per-row and
    per-key factors (HunyuanVideo 1.5's padding mask), which the rewrite passes to the op apart."""
    mask_node = site.args["attn_mask"]
    mask, q = example(mask_node), example(site.args["query"])
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or not isinstance(mask_node, torch.fx.Node):
        return "attention mask is not a tensor"
    seq = q.shape[2]
    if mask.dim() == 4 and all(same_size(a, b) for a, b in zip(mask.shape[1:], (1, 1, seq))):
        return None
    if all(isinstance(size, int) for size in (*mask.shape, seq)) and is_key_padding_mask(mask.shape, seq):
        return None
    factors = outer_product_factors(mask_node, seq)
    if isinstance(factors, str):
        return (
            f"attention mask of shape {tuple(mask.shape)}: {factors} (supported: key padding [B|1, 1, 1, N], "
            "or an outer product of a per-query and a per-key factor)"
        )
    site.mask_factors = factors
    return None


def not_supported_reason(args: dict) -> str | None:
    """Why this SDPA call cannot become RainFusion attention (None if it can)."""
    q, k, v = (example(args[name]) for name in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "query/key/value are not 4-D [B, H, N, D] tensors"
    if not same_size(q.shape[2], k.shape[2]):
        q_len, k_len = _hints(q.shape[2], k.shape[2])
        # Data-dependent lengths (no hint) cannot be compared here: the op compares them per call.
        if q_len is not None and k_len is not None and q_len != k_len:
            return f"cross-attention (query length {q.shape[2]} != key length {k.shape[2]})"
    if not same_size(q.shape[1], k.shape[1]) or args["enable_gqa"]:
        return f"grouped-query attention ({q.shape[1]} query heads, {k.shape[1]} key heads)"
    if args["is_causal"] is not False:
        return "causal attention"
    if isinstance(args["dropout_p"], torch.fx.Node) or args["dropout_p"] != 0.0:
        return "attention dropout"
    if isinstance(args["scale"], torch.fx.Node):
        return "softmax scale computed at run time"
    return None


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost nn.Module that made this call, e.g. ``transformer_blocks.0.attn1``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?|^L__self___?", "", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    path = re.sub(r"(^|\.)(__dict__|_modules)(?=\.)", "", path).strip(".")
    return without_hooks(path) or node.name


def source_line(node: torch.fx.Node) -> str:
    """``file.py:123`` of the innermost frame that called attention, from the node's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return ""
    path, line = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"
