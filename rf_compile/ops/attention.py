"""``torch.ops.rainfusion.attention``: the op the rewrite pass puts in place of SDPA.

One call = dense warm-up check -> ARM (variant per batch element and head) -> block-sparse
attention with each head's plan. The op is opaque to inductor (``register_fake`` gives it its
output shape) and inference-only. ``sparse_attention`` is the same computation as a plain
function, for users who call attention themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.ops import arm, v2
from rf_compile.ops.runtime import get_site
from rf_compile.ops.torch_attention import torch_sparse_attention
from rf_compile.plan import PlanTable, build_plan_table, variants_for

KERNEL_HEAD_DIMS = (64, 128)  # kernels.block_sparse.SUPPORTED_HEAD_DIMS, without importing triton here
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def output_like(q: torch.Tensor) -> torch.Tensor:
    """Empty [B, H, N, D] output laid out as (B, N, H, D) memory, the layout SDPA callers reshape for free."""
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2)


def key_padding_bias(attn_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """Turn a mask that only varies along keys ([B|1, 1, 1, N]) into an additive float [B, N] bias.

    Returns None for no mask; raises ValueError for masks of any other shape.
    """
    if attn_mask is None:
        return None
    if not is_key_padding_mask(attn_mask.shape, seq_len):
        raise ValueError(f"attention mask of shape {tuple(attn_mask.shape)} is not a key-padding mask [B|1, 1, 1, N]")
    mask = attn_mask.reshape(attn_mask.shape[0] if attn_mask.dim() == 4 else 1, seq_len).expand(batch, seq_len)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float().contiguous()


def is_key_padding_mask(shape: tuple[int, ...] | torch.Size, seq_len: int) -> bool:
    """Whether an SDPA mask of this shape varies only along the key dimension (and batch)."""
    shape = tuple(shape)
    if shape[-1:] != (seq_len,):
        return False
    if len(shape) == 4:
        return shape[1] == 1 and shape[2] == 1
    return all(s == 1 for s in shape[:-1])


def kernel_unsupported_reason(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> str | None:
    """Why the Triton kernel cannot run this call (None if it can)."""
    if q.device.type != "cuda":
        return f"tensors on {q.device.type}, the kernel needs CUDA"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (kernel: float16, bfloat16)"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (kernel: {', '.join(map(str, KERNEL_HEAD_DIMS))})"
    if attn_mask is not None and not is_key_padding_mask(attn_mask.shape, k.shape[-2]):
        return f"attention mask of shape {tuple(attn_mask.shape)} (kernel: key-padding masks [B|1, 1, 1, N])"
    return None


def _use_kernel(kernel: str, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    if kernel == "reference":
        return False
    reason = kernel_unsupported_reason(q, k, attn_mask)
    if kernel == "triton" and reason is not None:
        raise ValueError(f"kernel='triton' cannot run this call: {reason}")
    return reason is None


def _run_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: PlanTable,
    variant_of_head: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    kernel: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each (batch, head) under its plan: the Triton kernel (written into ``out`` if given) or the reference."""
    if _use_kernel(kernel, q, k, attn_mask):
        from rf_compile.kernels.block_sparse import block_sparse_attention

        bias = key_padding_bias(attn_mask, q.shape[0], k.shape[-2])
        return block_sparse_attention(q, k, v, table, variant_of_head.int(), scale=scale, key_bias=bias, out=out)
    result = torch_sparse_attention(q, k, v, table, variant_of_head, attn_mask, scale)
    return result if out is None else out.copy_(result)


def _in_output_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it already has the op's (B, N, H, D)-memory layout, else a copy in it."""
    B, H, N, D = x.shape
    if x.stride() == (N * H * D, D, H * D, 1):
        return x
    return output_like(x).copy_(x)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            "rainfusion attention takes self-attention q, k, v of shape [B, H, N, D] with equal B, H, N; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    layout.check_seq_len(q.shape[-2])
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "rainfusion attention is inference-only: run the model under torch.no_grad() "
            "or torch.inference_mode()"
        )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    *,
    config: RainFusionConfig | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """RainFusion attention of one call: ARM per head, then each head's sparse pattern.

    Parameters
    ----------
    q, k, v: [B, H, N, D]
        Self-attention inputs over a sequence of ``layout.seq_len`` tokens.
    layout:
        Where the video and text tokens sit.
    config:
        Mode, bandwidth(s), stride, ARM threshold; ``mode="dense"`` computes plain SDPA.
    attn_mask, scale:
        As in ``F.scaled_dot_product_attention``.

    Returns
    -------
    Tensor [B, H, N, D]
    """
    config = config or RainFusionConfig()
    _check_inputs(q, k, v, layout)
    if config.mode == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if config.mode == "v2":
        table, variant_of_head = _v2_plan(q, k, layout, config, scale)
    else:
        table = build_plan_table(layout, variants_for(config), q.device)
        variant_of_head = arm.classify_variants(q, k, layout, config, scale)
    return _run_sparse(q, k, v, table, variant_of_head, attn_mask, scale, config.kernel)


def _v2_plan(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, config: RainFusionConfig, scale: float | None
) -> tuple[PlanTable, torch.Tensor]:
    """RainFusion 2.0 plan: one variant per (batch element, head)."""
    B, H = q.shape[:2]
    table = v2.predict_plan(q, k, layout, config, scale)
    return table, torch.arange(B * H, device=q.device).view(B, H)


@torch.library.custom_op("rainfusion::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    timestep: torch.Tensor | None,
    scale: float | None,
    site: str,
) -> torch.Tensor:
    """The rewritten SDPA site ``site`` (registered by the rewrite pass with its layout and config)."""
    state = get_site(site)
    _check_inputs(q, k, v, state.layout)
    dense = state.is_dense_call(timestep)
    state.calls += 1
    if dense:
        state.dense_calls += 1
        return _in_output_layout(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale))
    out = output_like(q)
    config = state.config
    if config.mode == "v2":
        table, variant_of_head = _v2_plan(q, k, state.layout, config, scale)
        state.record_blocks(table.density().view(q.shape[:2]))
        return _run_sparse(q, k, v, table, variant_of_head, attn_mask, scale, config.kernel, out)
    table = build_plan_table(state.layout, state.variants, q.device)
    variant_of_head, recall = state.decision_for_call(
        q.shape[:2], lambda: arm.decide(q, k, state.layout, config, scale)
    )
    state.record(variant_of_head, recall, table.score_density.to(q.device))
    return _run_sparse(q, k, v, table, variant_of_head, attn_mask, scale, config.kernel, out)


@attention.register_fake
def _(q, k, v, attn_mask, timestep, scale, site):
    return output_like(q)
