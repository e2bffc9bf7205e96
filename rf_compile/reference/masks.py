"""Token-level masks of the RainFusion v1 head patterns, in the original token order.

This is the ground truth the block plans and kernels are tested against, written straight from
the paper's definitions (section 3.2) with the project's conventions:

- Text rows and columns (tokens outside the video) are always attended.
- Spatial: a band of half-width ``floor(bandwidth * video_tokens)`` around the diagonal in
  frame-major order (nearby tokens, so whole nearby frames).
- Temporal: the same band in spatial-major order (nearby positions, across all frames).
- Textural: only video keys on the checkerboard ``h % stride == w % stride`` (Eq. 4).
"""

from __future__ import annotations

import torch

from rf_compile.layout import VideoLayout


def band_halfwidth(layout: VideoLayout, bandwidth: float) -> int:
    """Band half-width in tokens; ``bandwidth = 1/4`` keeps ``1 - (3/4)^2 = 7/16`` of the scores."""
    return int(bandwidth * layout.video_tokens)


def _is_text(layout: VideoLayout, device: torch.device | str) -> torch.Tensor:
    index = torch.arange(layout.seq_len, device=device)
    return (index < layout.prefix) | (index >= layout.prefix + layout.video_tokens)


def _with_text(layout: VideoLayout, video_mask: torch.Tensor) -> torch.Tensor:
    """Embed a [V, V] video mask in the full [N, N] mask with dense text rows and columns."""
    text = _is_text(layout, video_mask.device)
    mask = text[:, None] | text[None, :]
    mask[layout.video_slice, layout.video_slice] = video_mask
    return mask


def spatial_mask(layout: VideoLayout, bandwidth: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [N, N]: frame-major band (global spatial, local temporal)."""
    video = torch.arange(layout.video_tokens, device=device)
    width = band_halfwidth(layout, bandwidth)
    return _with_text(layout, (video[:, None] - video[None, :]).abs() <= width)


def temporal_mask(layout: VideoLayout, bandwidth: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [N, N]: spatial-major band (local spatial, global temporal)."""
    video = torch.arange(layout.video_tokens, device=device)
    frame, position = video // layout.frame_tokens, video % layout.frame_tokens
    spatial_major = position * layout.frames + frame
    width = band_halfwidth(layout, bandwidth)
    return _with_text(layout, (spatial_major[:, None] - spatial_major[None, :]).abs() <= width)


def textural_mask(layout: VideoLayout, stride: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [N, N]: every query sees the checkerboard subset of video keys (and all text)."""
    keep = layout.checkerboard(stride, device)
    return _with_text(layout, keep[None, :].expand(layout.video_tokens, -1).clone())
