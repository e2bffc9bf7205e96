"""Give each eligible site its VideoLayout: the user's override, else inference from the graph.

Also decides what computes a sparse site (Triton kernel or PyTorch reference) and keeps dense
the sites where sparsity does not apply or does not pay.
"""

from __future__ import annotations

import torch

from rf_compile.ops.attention import kernel_unsupported_reason
from rf_compile.passes.context import PassContext
from rf_compile.passes.find_attention import example


def assign_layouts(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    config = ctx.config
    candidates = [site for site in ctx.sites if site.eligible]
    for site in candidates:
        seq_len = site.report.seq_len
        if config.layout is not None:
            layout = config.layout
            if layout.seq_len != seq_len:
                site.make_dense(f"sequence length {seq_len} does not match the layout option ({layout.describe()})")
                continue
        else:
            from rf_compile.passes.infer_layout import infer_site_layout

            layout = infer_site_layout(gm, site.node)
            if isinstance(layout, str):
                site.make_dense(layout)
                continue
        site.report.layout = layout
        if layout.frames == 1 and config.mode in ("v1", "v1+"):
            site.make_dense("single-frame (image) grid: the v1 head patterns need frames; mode='v2' makes it sparse")
            continue
        if layout.video_tokens < config.min_video_tokens:
            site.make_dense(f"{layout.video_tokens} video tokens < min_video_tokens={config.min_video_tokens}")
            continue
        _choose_kernel(site, config.kernel)
    if config.layout is not None and candidates and not any(s.report.layout for s in candidates):
        lengths = sorted({s.report.seq_len for s in candidates})
        raise ValueError(
            f"layout option {config.layout.describe()} ({config.layout.seq_len} tokens) matches no "
            f"self-attention site; their sequence lengths are {lengths}"
        )


def _choose_kernel(site, kernel: str) -> None:
    q, k = example(site.args["query"]), example(site.args["key"])
    mask = example(site.args["attn_mask"])
    if kernel == "reference":
        site.report.kernel = "reference"
        return
    reason = kernel_unsupported_reason(q, k, mask)
    if reason is None:
        site.report.kernel = "triton"
    elif q.device.type == "cuda" or kernel == "triton":
        # The O(N^2) reference is no option at GPU sizes: keep SDPA.
        site.make_dense(f"kernel does not support {reason}")
    else:
        site.report.kernel = "reference"
