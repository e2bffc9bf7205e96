"""Adaptive Recognition Module: which pattern (and bandwidth) each head uses, on the device.

Algorithm 1 of the paper, vectorised over batch, heads and bandwidths: the local sample (the
first frame's tokens) estimates the recall of the temporal mask, the global sample (every
omega-th video token) the recall of the spatial mask. Everything stays on the device: the
decision is a tensor of variant ids, never read back by the host. On CUDA two Triton launches
compute both samples' recalls and the decision (``kernels.arm``); elsewhere PyTorch does. Samples
longer than ``arm_query_rows`` average over every r-th query row (all keys), in both paths.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.plan import Pattern, band_halfwidth, variants_for


def _use_triton(q: torch.Tensor) -> bool:
    return q.is_cuda


class Sample(NamedTuple):
    """One ARM sample of q/k: ``count`` tokens ``stride`` apart from ``start`` along the sequence,
    ``position_step`` apart in the pattern's token order; every ``row_stride``-th is a query row."""

    start: int
    stride: int
    count: int
    position_step: int
    row_stride: int


def row_stride(count: int, query_rows: int | None) -> int:
    """Every how many sampled tokens a query row is taken: ``ceil(count / query_rows)``; 1 for ``None``.

    The recall is a mean over query rows of each row's in-band softmax mass, so every r-th row
    estimates it at 1/r of the cost; the keys, and so each row's softmax, stay whole.
    """
    return 1 if query_rows is None else -(-count // query_rows)


def _samples(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, sample_stride: int | None, query_rows: int | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[Sample, Sample]]:
    """q and k holding the local (temporal) and the global (spatial) sample, and where each lies in them.

    The inputs themselves, where both samples are strided slices; for rank shards a gather of both.
    """
    P, F = layout.prefix, layout.frames
    omega = sample_stride or F
    # Local: frame 0, whose tokens sit F apart in spatial-major order. Global: every omega-th video
    # token, omega apart in frame-major order.
    local, global_ = range(P, P + layout.frame_tokens), range(P, P + layout.video_tokens, omega)
    counts, steps = (len(local), len(global_)), (F, omega)
    if layout.shards == 1:
        starts, strides = (P, P), (1, omega)
    else:
        canonical = torch.cat([torch.arange(r.start, r.stop, r.step, device=q.device) for r in (local, global_)])
        index = layout.placed(canonical)
        q, k = q.index_select(-2, index), k.index_select(-2, index)
        starts, strides = (0, counts[0]), (1, 1)
    local_sample, global_sample = (
        Sample(start, stride, count, step, row_stride(count, query_rows))
        for start, stride, count, step in zip(starts, strides, counts, steps, strict=True)
    )
    return q, k, (local_sample, global_sample)


def _call_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    bandwidths: tuple[float, ...],
    sample_stride: int | None,
    query_rows: int | None,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[Sample, Sample], list[int], float]:
    """What both paths of one ARM call start from: the samples' q and k, where the samples lie, the
    band half-widths in tokens and the softmax scale (SDPA's default when None)."""
    halfwidths = [band_halfwidth(layout, b) for b in bandwidths]
    q_s, k_s, samples = _samples(q, k, layout, sample_stride, query_rows)
    return q_s, k_s, samples, halfwidths, q.shape[-1] ** -0.5 if scale is None else scale


def _sampled_recall(
    q: torch.Tensor, k: torch.Tensor, sample: Sample, halfwidths: list[int], scale: float
) -> torch.Tensor:
    """Recall [B, H, nb] of the bands ``|pos_i - pos_j| <= halfwidth`` in one sample, in PyTorch (S x S fp32 scores)."""
    start, stride, count, step, r = sample
    tokens = slice(start, start + (count - 1) * stride + 1, stride)
    queries, keys = q[..., tokens, :][..., ::r, :], k[..., tokens, :]
    probs = torch.softmax(torch.matmul(queries, keys.transpose(-1, -2)).float().mul_(scale), dim=-1)
    position = torch.arange(count, device=q.device) * step
    distance = (position[::r, None] - position[None, :]).abs()
    inside = torch.stack([distance <= width for width in halfwidths]).to(probs.dtype)  # [nb, rows, S]
    return torch.einsum("bhqk,nqk->bhn", probs, inside) / queries.shape[-2]


def arm_recalls(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    bandwidths: tuple[float, ...],
    sample_stride: int | None = None,
    scale: float | None = None,
    enabled: torch.Tensor | None = None,
    query_rows: int | None = None,
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
    query_rows:
        Most query rows per sample (``RainFusionConfig.arm_query_rows``); ``None`` takes every row.
    """
    q, k, samples, halfwidths, scale = _call_inputs(q, k, layout, bandwidths, sample_stride, query_rows, scale)
    if _use_triton(q):
        from rf_compile.kernels.arm import band_recall

        recalls = band_recall(q, k, samples, halfwidths, scale, threshold=1.0, enabled=enabled).recalls
        return recalls[:, :, 0], recalls[:, :, 1]
    recall_t, recall_s = (_sampled_recall(q, k, sample, halfwidths, scale) for sample in samples)
    return recall_t, recall_s


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
    if _use_triton(q):  # recalls and choice in the kernels: two launches in all
        from rf_compile.kernels.arm import band_recall

        qs, ks, samples, halfwidths, scale = _call_inputs(
            q, k, layout, config.head_bandwidths, config.sample_stride, config.arm_query_rows, scale
        )
        _, variants, recall = band_recall(qs, ks, samples, halfwidths, scale, config.threshold, enabled)
        return variants, recall
    recall_t, recall_s = arm_recalls(
        q, k, layout, config.head_bandwidths, config.sample_stride, scale, query_rows=config.arm_query_rows
    )
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
