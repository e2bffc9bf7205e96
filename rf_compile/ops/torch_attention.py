"""Plain-PyTorch executor of a ``PlanTable``: the CPU path of the op (``kernel="reference"``).

Each (batch, head) runs SDPA under the element mask its plan computes (``plan.element_mask``),
so it follows the plan exactly as the Triton kernel does. O(N^2) memory per head: for CPU runs
and small shapes, not a fast path. The independent ground truth is ``rf_compile.reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rf_compile.plan import PlanTable, element_mask


def variant_masks(table: PlanTable) -> torch.Tensor:
    """Bool [P, N, N]: each plan's mask in the original token order."""
    return torch.stack([element_mask(table, p) for p in range(table.num_plans)])


def combine_masks(pattern_mask: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a user SDPA mask (bool: True attends; float: additive) on top of a bool pattern mask."""
    if attn_mask is None:
        return pattern_mask
    if attn_mask.dtype == torch.bool:
        return pattern_mask & attn_mask
    return torch.where(pattern_mask, attn_mask, float("-inf")).to(attn_mask.dtype)


def torch_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: PlanTable,
    variant_of_head: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each (batch, head) under its plan's mask; [B, H, N, D] like q.

    ``variant_of_head`` (int [B, H]) picks a row of ``table`` per head; ``attn_mask`` is an SDPA
    mask applied on top.
    """
    masks = variant_masks(table).to(q.device)[variant_of_head.long()]  # [B, H, N, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=combine_masks(masks, attn_mask), scale=scale)
