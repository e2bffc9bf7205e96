"""Pure-PyTorch Adaptive Recognition Module, literally as Algorithm 1 of the paper.

The sampled masks are cut out of the full token-level masks of ``reference.masks``
(``mask[idx][:, idx]``), so this is only usable on small layouts. ``rf_compile.ops.arm`` is the
fast version and is tested against this one.
"""

from __future__ import annotations

import torch

from rf_compile.layout import VideoLayout
from rf_compile.reference import masks


def sample_indices(layout: VideoLayout, sample_stride: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the local sample (first frame) and the global sample (every omega-th video token)."""
    omega = sample_stride or layout.frames
    c = masks.token_coords(layout)
    number = (c["frame"] * layout.height + c["h"]) * layout.width + c["w"]  # frame-major video number
    where = torch.empty(layout.video_tokens, dtype=torch.long)
    where[number[c["video"]]] = torch.nonzero(c["video"]).flatten()  # video number -> token index
    return where[: layout.frame_tokens], where[::omega]


def masked_recall(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 6: share of the sampled attention mass inside ``mask``, averaged over query rows -> [B, H]."""
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    return (probs * mask).sum(-1).mean(-1)


def arm_recalls(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    bandwidths: tuple[float, ...],
    sample_stride: int | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated recall of the temporal (local sample) and spatial (global sample) masks.

    Returns two float64 tensors [B, H, len(bandwidths)].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    local, global_ = sample_indices(layout, sample_stride)
    temporal, spatial = [], []
    for bandwidth in bandwidths:
        m_t = masks.temporal_mask(layout, bandwidth)[local][:, local]
        m_s = masks.spatial_mask(layout, bandwidth)[global_][:, global_]
        temporal.append(masked_recall(q[..., local, :], k[..., local, :], m_t, scale))
        spatial.append(masked_recall(q[..., global_, :], k[..., global_, :], m_s, scale))
    return torch.stack(temporal, -1), torch.stack(spatial, -1)


def choose_variants(recall_temporal: torch.Tensor, recall_spatial: torch.Tensor, threshold: float) -> torch.Tensor:
    """Algorithm 1 with RainFusion+ bandwidths: temporal first, then spatial, else textural.

    Recalls are [B, H, nb] for bandwidths in ascending order; the smallest bandwidth reaching
    ``threshold`` wins. Returns variant ids [B, H] in ``rf_compile.plan.variants_for`` order
    (spatial 0..nb-1, temporal nb..2nb-1, textural 2nb).
    """
    B, H, nb = recall_temporal.shape
    out = torch.full((B, H), 2 * nb, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            temporal = [i for i in range(nb) if recall_temporal[b, h, i] >= threshold]
            spatial = [i for i in range(nb) if recall_spatial[b, h, i] >= threshold]
            if temporal:
                out[b, h] = nb + temporal[0]
            elif spatial:
                out[b, h] = spatial[0]
    return out
