"""Token-level masks of the RainFusion head patterns, straight from the paper's definitions.

This is the ground truth the block plans (``rf_compile.plan``) and the kernels are tested
against, so it shares no code with them: it reads only the sizes of a ``VideoLayout`` (never its
token orders or checkerboard) and the ``Pattern`` enum. Every mask is bool, True where a query
(row) may attend a key (column), in the original token order. Conventions (paper section 3.2,
with the project's handling of text):

- Text rows and columns (tokens outside the video) are always attended.
- Spatial (Eq. 3, "global striped" mask): video tokens are numbered frame-major,
  ``f * H * W + h * W + w``; a query sees the keys whose number differs by at most the band
  half-width ``floor(bandwidth * video_tokens)`` (nearby tokens, so whole nearby frames).
  ``bandwidth = 1/4`` keeps ``1 - (3/4)^2 = 7/16`` of the video scores (the paper's 9/16 saving).
- Temporal: the same band over the spatial-major numbering ``(h * W + w) * F + f`` (nearby
  positions, across all frames).
- Textural (Eq. 4, 5): every query sees only the video keys on the checkerboard
  ``h mod tau == w mod tau``.
- Dense: every pair.
- Block selections (RainFusion 2.0): ``block_mask`` expands a chosen set of (query block, key
  block) pairs over a token order to elements.

Plain PyTorch, O(N^2) memory: small layouts only.
"""

from __future__ import annotations

import torch

from rf_compile.layout import VideoLayout
from rf_compile.plan import Pattern

__all__ = [
    "band_tokens",
    "block_mask",
    "dense_mask",
    "pattern_mask",
    "spatial_mask",
    "temporal_mask",
    "textural_mask",
    "token_coords",
]


def band_tokens(layout: VideoLayout, bandwidth: float) -> int:
    """Half-width of the band in tokens: ``floor(bandwidth * video_tokens)``."""
    return int(bandwidth * layout.video_tokens)


def token_coords(layout: VideoLayout, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Per token (int64 [N]): ``video`` (bool), ``frame``, ``h``, ``w`` (-1 for text tokens).

    Tokens in ``layout.shards`` rank chunks: chunk ``r`` holds the r-th shares of the prefix, the
    video and the suffix, in that order; video token ``i`` of chunk ``r`` is number ``r * V / R + i``.
    """
    N = layout.frames * layout.height * layout.width + layout.prefix + layout.suffix
    R = layout.shards
    index = torch.arange(N, device=device)
    rank, local = index // (N // R), index % (N // R)
    v = local - layout.prefix // R
    in_share = (v >= 0) & (v < layout.frames * layout.height * layout.width // R)
    v = torch.where(in_share, rank * (layout.frames * layout.height * layout.width // R) + v, -1)
    video = (v >= 0) & (v < layout.frames * layout.height * layout.width)
    per_frame = layout.height * layout.width
    frame = torch.where(video, v // per_frame, -1)
    h = torch.where(video, (v % per_frame) // layout.width, -1)
    w = torch.where(video, v % layout.width, -1)
    return {"video": video, "frame": frame, "h": h, "w": w}


def _masked(
    layout: VideoLayout, device: torch.device | str, rows: torch.Tensor | None, video_rule
) -> torch.Tensor:
    """Bool [R, N]: ``video_rule(coords, rows)`` (bool [R, N]) where query and key are video, True where either is text.

    ``rows`` are original query indices (all if None); only [R, N] is ever built.
    """
    c = token_coords(layout, device)
    rows = torch.arange(len(c["video"]), device=device) if rows is None else rows.to(device).long()
    video = c["video"]
    return video_rule(c, rows) | ~video[rows][:, None] | ~video[None, :]


def _band(number: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    return (number[rows][:, None] - number[None, :]).abs() <= width


def spatial_mask(
    layout: VideoLayout, bandwidth: float, device: torch.device | str = "cpu", rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [N, N] (or [len(rows), N]): band over the frame-major numbering (global spatial, local temporal)."""
    width = band_tokens(layout, bandwidth)

    def rule(c: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        return _band((c["frame"] * layout.height + c["h"]) * layout.width + c["w"], rows, width)

    return _masked(layout, device, rows, rule)


def temporal_mask(
    layout: VideoLayout, bandwidth: float, device: torch.device | str = "cpu", rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [N, N] (or [len(rows), N]): band over the spatial-major numbering (local spatial, global temporal)."""
    width = band_tokens(layout, bandwidth)

    def rule(c: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        return _band((c["h"] * layout.width + c["w"]) * layout.frames + c["frame"], rows, width)

    return _masked(layout, device, rows, rule)


def textural_mask(
    layout: VideoLayout, stride: int, device: torch.device | str = "cpu", rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [N, N] (or [len(rows), N]): every query sees the checkerboard video keys (and all text)."""

    def rule(c: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        kept = (c["h"] % stride) == (c["w"] % stride)
        return kept[None, :].expand(len(rows), -1)

    return _masked(layout, device, rows, rule)


def dense_mask(
    layout: VideoLayout, device: torch.device | str = "cpu", rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [N, N] (or [len(rows), N]) of ones: dense attention."""
    N = layout.frames * layout.height * layout.width + layout.prefix + layout.suffix
    return torch.ones(N if rows is None else len(rows), N, dtype=torch.bool, device=device)


def pattern_mask(
    layout: VideoLayout,
    pattern: Pattern,
    bandwidth: float = 0.0,
    stride: int = 0,
    device: torch.device | str = "cpu",
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mask of one head pattern: ``bandwidth`` for spatial / temporal heads, ``stride`` for textural ones."""
    if pattern == Pattern.SPATIAL:
        return spatial_mask(layout, bandwidth, device, rows)
    if pattern == Pattern.TEMPORAL:
        return temporal_mask(layout, bandwidth, device, rows)
    if pattern == Pattern.TEXTURAL:
        return textural_mask(layout, stride, device, rows)
    if pattern == Pattern.DENSE:
        return dense_mask(layout, device, rows)
    raise ValueError(f"unknown pattern {pattern!r}")


def block_mask(order: torch.Tensor, selected: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Bool [N, N] in the original order from a block selection over a token order.

    ``order`` (int [N]): ``order[p]`` is the original index of the token at position ``p``;
    ``selected`` (bool [Mq, Mk]): whether query block ``m`` (positions ``m * block_m ...``) attends
    key block ``n``. Token ``i`` sees token ``j`` iff their blocks' pair is selected.
    """
    N = len(order)
    position = torch.empty_like(order)
    position[order.long()] = torch.arange(N, device=order.device, dtype=order.dtype)
    position = position.long()
    return selected.to(torch.bool)[position[:, None] // block_m, position[None, :] // block_n]
