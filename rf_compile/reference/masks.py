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


def _mask(layout: VideoLayout, rows: torch.Tensor | None, device, video_rule) -> torch.Tensor:
    """Bool [R, N] for query ``rows`` (all if None): text rows/columns dense, ``video_rule`` elsewhere.

    ``video_rule(query_video_index [R'], key_video_index [V]) -> bool [R', V]``.
    """
    rows = torch.arange(layout.seq_len, device=device) if rows is None else rows.to(device)
    text = _is_text(layout, device)
    mask = text[rows][:, None] | text[None, :]
    video_rows = ~text[rows]
    keys = torch.arange(layout.video_tokens, device=device)
    mask[video_rows, layout.video_slice] = video_rule(rows[video_rows] - layout.prefix, keys)
    return mask


def spatial_mask(
    layout: VideoLayout, bandwidth: float, device: torch.device | str = "cpu", rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [N, N] (or [len(rows), N]): frame-major band (global spatial, local temporal)."""
    width = band_halfwidth(layout, bandwidth)
    return _mask(layout, rows, device, lambda i, j: (i[:, None] - j[None, :]).abs() <= width)


def temporal_mask(
    layout: VideoLayout, bandwidth: float, device: torch.device | str = "cpu", rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [N, N] (or [len(rows), N]): spatial-major band (local spatial, global temporal)."""
    width = band_halfwidth(layout, bandwidth)

    def rule(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        i, j = ((t % layout.frame_tokens) * layout.frames + t // layout.frame_tokens for t in (i, j))
        return (i[:, None] - j[None, :]).abs() <= width

    return _mask(layout, rows, device, rule)


def textural_mask(
    layout: VideoLayout, stride: int, device: torch.device | str = "cpu", rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [N, N] (or [len(rows), N]): every query sees the checkerboard subset of video keys (and all text)."""
    keep = layout.checkerboard(stride, device)
    return _mask(layout, rows, device, lambda i, j: keep[None, :].expand(len(i), -1))
