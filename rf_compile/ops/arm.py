"""Adaptive Recognition Module: which pattern (and bandwidth) each head uses, on the device.

Algorithm 1 of the paper, vectorised over batch, heads and bandwidths: the local sample (the
first frame's tokens) estimates the recall of the temporal mask, the global sample (every
omega-th video token) the recall of the spatial mask. Everything stays on the device: the
decision is a tensor of variant ids, never read back by the host.
"""

from __future__ import annotations

import torch

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.plan import Pattern, band_halfwidth, variants_for


def _use_triton(q: torch.Tensor) -> bool:
    return q.is_cuda


def _sampled_recall(
    q: torch.Tensor, k: torch.Tensor, step: int, halfwidths: list[int], scale: float, enabled: torch.Tensor | None
) -> torch.Tensor:
    """Recall [B, H, nb] of bands ``|pos_i - pos_j| <= halfwidth`` over samples ``step`` positions apart.

    On CUDA a Triton kernel computes it without writing the S x S scores; elsewhere PyTorch does.
    """
    if _use_triton(q):
        from rf_compile.kernels.arm import band_recall

        return band_recall(q, k, step, halfwidths, scale, enabled)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    probs = torch.softmax(scores, dim=-1)
    position = torch.arange(q.shape[-2], device=q.device) * step
    distance = (position[:, None] - position[None, :]).abs()
    inside = torch.stack([distance <= width for width in halfwidths]).to(probs.dtype)  # [nb, S, S]
    return torch.einsum("bhqk,nqk->bhn", probs, inside) / q.shape[-2]


def arm_recalls(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    bandwidths: tuple[float, ...],
    sample_stride: int | None = None,
    scale: float | None = None,
    enabled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated recall of the temporal and spatial masks, float32 [B, H, len(bandwidths)] each.

    Parameters
    ----------
    q, k: [B, H, N, D]
        The attention inputs of one call.
    bandwidths:
        Band fractions, ascending.
    enabled:
        Optional bool scalar on the device: the CUDA kernel skips its work where it is False (the
        results are then meaningless and the caller keeps its last decision). PyTorch ignores it.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    P, F = layout.prefix, layout.frames
    omega = sample_stride or F
    halfwidths = [band_halfwidth(layout, b) for b in bandwidths]
    # Local sample: frame 0. In spatial-major order its tokens sit F apart.
    local = slice(P, P + layout.frame_tokens)
    recall_t = _sampled_recall(_tokens(q, layout, local), _tokens(k, layout, local), F, halfwidths, scale, enabled)
    # Global sample: every omega-th video token, omega apart in frame-major order.
    global_ = slice(P, P + layout.video_tokens, omega)
    recall_s = _sampled_recall(
        _tokens(q, layout, global_), _tokens(k, layout, global_), omega, halfwidths, scale, enabled
    )
    return recall_t, recall_s


def _tokens(x: torch.Tensor, layout: VideoLayout, canonical: slice) -> torch.Tensor:
    """``x[..., canonical, :]`` in the canonical token order: a view, or a gather for rank shards."""
    if layout.shards == 1:
        return x[..., canonical, :]
    index = layout.placed(torch.arange(canonical.start, canonical.stop, canonical.step or 1, device=x.device))
    return x.index_select(-2, index)


def choose_variants(recall_temporal: torch.Tensor, recall_spatial: torch.Tensor, threshold: float) -> torch.Tensor:
    """Variant ids [B, H] (``variants_for`` order) from recalls [B, H, nb], bandwidths ascending.

    Temporal first, then spatial, each at the smallest bandwidth reaching ``threshold``;
    textural when neither does.
    """
    nb = recall_temporal.shape[-1]
    index = torch.arange(nb, device=recall_temporal.device)

    def smallest_passing(recall: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        passing = recall >= threshold
        first = torch.where(passing, index, nb).amin(-1)
        return passing.any(-1), first

    temporal_ok, temporal_first = smallest_passing(recall_temporal)
    spatial_ok, spatial_first = smallest_passing(recall_spatial)
    textural = torch.full_like(temporal_first, 2 * nb)
    return torch.where(temporal_ok, nb + temporal_first, torch.where(spatial_ok, spatial_first, textural))


def decide(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    config: RainFusionConfig,
    scale: float | None = None,
    enabled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variant id (int64 [B, H], ``variants_for`` order) and the estimated recall of its mask.

    The recall is float32 [B, H], NaN for textural heads (the ARM estimates no textural recall).
    """
    recall_t, recall_s = arm_recalls(q, k, layout, config.head_bandwidths, config.sample_stride, scale, enabled)
    variants = choose_variants(recall_t, recall_s, config.threshold)
    recalls = torch.cat([recall_s, recall_t, torch.full_like(recall_t[..., :1], float("nan"))], dim=-1)
    return variants, recalls.gather(-1, variants[..., None]).squeeze(-1)


def classify_variants(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, config: RainFusionConfig, scale: float | None = None
) -> torch.Tensor:
    """Variant id per (batch element, head), int64 [B, H], on q's device."""
    return decide(q, k, layout, config, scale)[0]


def classify_heads(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, config: RainFusionConfig | None = None
) -> torch.Tensor:
    """The ARM's pattern per (batch element, head): int64 [B, H] of ``Pattern`` values.

    Parameters
    ----------
    q, k: [B, H, N, D]
        Queries and keys of one attention call over a sequence described by ``layout``.
    config:
        ``alpha``, ``sample_stride`` and, in mode ``"v1+"``, the candidate bandwidths.
    """
    config = config or RainFusionConfig()
    layout.check_seq_len(q.shape[-2])
    variants = classify_variants(q, k, layout, config)
    pattern_of = torch.tensor([v.pattern for v in variants_for(config)], device=q.device)
    return pattern_of[variants]


__all__ = ["Pattern", "arm_recalls", "choose_variants", "classify_heads", "classify_variants", "decide"]
