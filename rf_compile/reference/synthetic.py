"""Synthetic attention inputs with a planted head pattern, built from 3-D position features.

- spatial heads: q and k encode the frame, so a query attends whole nearby frames;
- temporal heads: q and k encode the (h, w) position, so a query attends its own position in
  every frame;
- textural heads: keys are random with a few salient tokens that every query attends, the
  irregular structure of the paper's Fig. 4;
- mixed heads (``pattern=None``): frame and position codes at once, so a query attends its
  frame and its position in every frame (neither mask holds all of it).
Text tokens get random features. Used by the ARM tests and the fidelity benchmark.
"""

from __future__ import annotations

import math

import torch

from rf_compile.layout import VideoLayout
from rf_compile.plan import Pattern


def _codes(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random unit vectors of size ``dim`` (nearly orthogonal when dim is large)."""
    codes = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return codes / codes.norm(dim=-1, keepdim=True)


def planted_head(
    layout: VideoLayout,
    pattern: Pattern | None,
    head_dim: int,
    generator: torch.Generator,
    strength: float = 6.0,
    noise: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k float64 [N, head_dim] of one head with the given pattern planted."""
    N, V, P = layout.seq_len, layout.video_tokens, layout.prefix
    video = torch.arange(V)
    frame, position = video // layout.frame_tokens, video % layout.frame_tokens
    q = torch.randn(N, head_dim, generator=generator, dtype=torch.float64) * noise
    k = torch.randn(N, head_dim, generator=generator, dtype=torch.float64) * noise
    scale = head_dim**0.25  # so that q.k / sqrt(head_dim) ~ strength^2 for matching codes
    if pattern == Pattern.SPATIAL:
        codes = _codes(layout.frames, head_dim, generator)[frame]
    elif pattern == Pattern.TEMPORAL:
        codes = _codes(layout.frame_tokens, head_dim, generator)[position]
    elif pattern is None:
        codes = _codes(layout.frames, head_dim, generator)[frame] + _codes(layout.frame_tokens, head_dim, generator)[
            position
        ]
        codes = codes / 2**0.5
    else:
        salient = torch.randperm(V, generator=generator)[: max(1, math.isqrt(V))]
        direction = _codes(1, head_dim, generator)
        q[P : P + V] += strength * scale * direction
        k[P + salient] += strength * scale * direction
        return q, k
    q[P : P + V] += strength * scale * codes
    k[P : P + V] += strength * scale * codes
    return q, k


def planted_qk(
    layout: VideoLayout,
    patterns: list[Pattern | None],
    head_dim: int = 64,
    batch: int = 1,
    seed: int = 0,
    strength: float = 6.0,
    noise: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [batch, len(patterns), N, head_dim] with head h planted as ``patterns[h]`` (None: mixed)."""
    generator = torch.Generator().manual_seed(seed)
    qs, ks = [], []
    for _ in range(batch):
        heads = [planted_head(layout, p, head_dim, generator, strength, noise) for p in patterns]
        qs.append(torch.stack([q for q, _ in heads]))
        ks.append(torch.stack([k for _, k in heads]))
    return torch.stack(qs).to(dtype), torch.stack(ks).to(dtype)
