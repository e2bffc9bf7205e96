"""Exact attention recall of the RainFusion masks from full attention maps, and the oracle's choice.

The masks are written here from the paper's definitions (section 3.2), independently of
``rf_compile``'s plans, with the project's conventions: only video query rows count, text keys are
always kept; spatial = band of half-width ``floor(bandwidth * video_tokens)`` in frame-major order;
temporal = the same band in spatial-major order (position, then frame); textural = video keys on
the checkerboard ``h % stride == w % stride`` (Eq. 4).

The recall of a mask is the softmax mass inside it, averaged over video query rows. The oracle
picks, among the spatial/temporal masks of equal cost (same bandwidth), the one with the highest
exact recall if it reaches the threshold, the cheapest bandwidth first (v1+); else textural.
``arm_choice`` gives the ARM's (``rf_compile.classify_heads``) choice in the same terms.
"""

from __future__ import annotations

import torch

from rf_compile import Pattern, RainFusionConfig, VideoLayout, classify_heads

SPATIAL, TEMPORAL, TEXTURAL = int(Pattern.SPATIAL), int(Pattern.TEMPORAL), int(Pattern.TEXTURAL)
NAMES = {SPATIAL: "spatial", TEMPORAL: "temporal", TEXTURAL: "textural"}


def _video_positions(layout: VideoLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-major and spatial-major position of every video token, int64 [V] each."""
    i = torch.arange(layout.video_tokens, device=device)
    return i, (i % layout.frame_tokens) * layout.frames + i // layout.frame_tokens


def mask_rows(layout: VideoLayout, kind: str, param: float, rows: torch.Tensor) -> torch.Tensor:
    """Bool [len(rows), seq_len]: keys kept for video query ``rows`` (indices into the video tokens)."""
    device = rows.device
    mask = torch.ones(len(rows), layout.seq_len, dtype=torch.bool, device=device)
    frame_major, spatial_major = _video_positions(layout, device)
    if kind == "textural":
        h = torch.arange(layout.height, device=device).view(-1, 1)
        w = torch.arange(layout.width, device=device).view(1, -1)
        keep = ((h % int(param)) == (w % int(param))).flatten().repeat(layout.frames)
        video = keep[None, :].expand(len(rows), -1)
    else:
        pos = frame_major if kind == "spatial" else spatial_major
        width = int(param * layout.video_tokens)
        video = (pos[rows][:, None] - pos[None, :]).abs() <= width
    mask[:, layout.video_slice] = video
    return mask


def density(layout: VideoLayout, kind: str, param: float) -> float:
    """Fraction of (video query, key) pairs a mask keeps."""
    rows = torch.arange(layout.video_tokens)
    return mask_rows(layout, kind, param, rows).double().mean().item()


@torch.no_grad()
def exact_recalls(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, variants: list[tuple[str, float]], chunk: int = 1024
) -> torch.Tensor:
    """Exact recall of each mask in ``variants`` per (batch, head): float64 [B, H, len(variants)].

    ``q, k``: [B, H, N, D] of one self-attention call (scale ``D ** -0.5``, as the models use).
    """
    B, H, N, D = q.shape
    layout.check_seq_len(N)
    total = torch.zeros(B, H, len(variants), dtype=torch.float64, device=q.device)
    for start in range(0, layout.video_tokens, chunk):
        rows = torch.arange(start, min(start + chunk, layout.video_tokens), device=q.device)
        scores = torch.matmul(q[:, :, rows + layout.prefix].float(), k.float().transpose(-1, -2)) * D**-0.5
        probs = torch.softmax(scores, dim=-1)
        for i, (kind, param) in enumerate(variants):
            mask = mask_rows(layout, kind, param, rows).float()
            total[..., i] += torch.einsum("bhrn,rn->bh", probs, mask).double()
    return total / layout.video_tokens


def variants_of(config: RainFusionConfig) -> list[tuple[str, float]]:
    """Masks the oracle compares: spatial and temporal at each bandwidth (ascending), then textural."""
    out = []
    for b in config.head_bandwidths:
        out += [("spatial", b), ("temporal", b)]
    return out + [("textural", config.stride)]


def oracle_choice(recalls: torch.Tensor, config: RainFusionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern int64 [B, H], bandwidth float64 [B, H] (0 for textural)) from ``exact_recalls(variants_of(config))``."""
    bandwidths = config.head_bandwidths
    pattern = torch.full(recalls.shape[:2], TEXTURAL, dtype=torch.long, device=recalls.device)
    bandwidth = torch.zeros(recalls.shape[:2], dtype=torch.float64, device=recalls.device)
    decided = torch.zeros(recalls.shape[:2], dtype=torch.bool, device=recalls.device)
    for i, b in enumerate(bandwidths):  # cheapest first
        r_s, r_t = recalls[..., 2 * i], recalls[..., 2 * i + 1]
        best = torch.where(r_t >= r_s, TEMPORAL, SPATIAL)
        ok = ~decided & (torch.maximum(r_s, r_t) >= config.threshold)
        pattern = torch.where(ok, best, pattern)
        bandwidth = torch.where(ok, torch.full_like(bandwidth, b), bandwidth)
        decided |= ok
    return pattern, bandwidth


def arm_choice(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, config: RainFusionConfig):
    """The ARM's (pattern [B, H], bandwidth [B, H]) through the public ``classify_heads``.

    v1: one call. v1+: one v1 call per candidate bandwidth at the v1+ threshold; the v1+ rule
    (temporal at the smallest passing bandwidth, else spatial at the smallest, else textural) is
    rebuilt from them, which is exact because a v1 call reports spatial only where temporal fails.
    """
    if config.mode != "v1+":
        pattern = classify_heads(q, k, layout, config)
        # float64 from the start: a float32 0.18 would match no oracle bandwidth (``recall_of``).
        bandwidth = torch.full(pattern.shape, config.bandwidth, dtype=torch.float64, device=pattern.device)
        return pattern, torch.where(pattern == TEXTURAL, 0.0, bandwidth)
    per_b = [
        classify_heads(q, k, layout, RainFusionConfig(bandwidth=b, alpha=config.recall_target,
                                                      sample_stride=config.sample_stride, stride=config.stride))
        for b in config.head_bandwidths
    ]  # fmt: skip
    pattern = torch.full_like(per_b[0], TEXTURAL)
    bandwidth = torch.zeros(pattern.shape, dtype=torch.float64, device=pattern.device)
    for kind in (SPATIAL, TEMPORAL):  # temporal last: it overrides spatial
        decided = torch.zeros_like(pattern, dtype=torch.bool)
        for b, chosen in zip(config.head_bandwidths, per_b):
            hit = (chosen == kind) & ~decided
            pattern = torch.where(hit, kind, pattern)
            bandwidth = torch.where(hit, b, bandwidth)
            decided |= hit
    return pattern, bandwidth


def recall_of(recalls: torch.Tensor, config: RainFusionConfig, pattern: torch.Tensor, bandwidth: torch.Tensor):
    """Exact recall [B, H] of the chosen (pattern, bandwidth) per head, from ``exact_recalls(variants_of)``."""
    index = torch.full(pattern.shape, 2 * len(config.head_bandwidths), dtype=torch.long, device=pattern.device)
    for i, b in enumerate(config.head_bandwidths):
        at_b = bandwidth == b
        index = torch.where(at_b & (pattern == SPATIAL), 2 * i, index)
        index = torch.where(at_b & (pattern == TEMPORAL), 2 * i + 1, index)
    return recalls.gather(-1, index[..., None]).squeeze(-1)


# -- the block oracle: the best block mask of a given density ------------------------------------------------


def block_mass(q: torch.Tensor, k: torch.Tensor, block: int, scale: float | None = None) -> torch.Tensor:
    """True attention mass of every (query block, key block) pair: float32 [B, H, M, M].

    The mean over a query block's rows of the softmax mass its keys of each key block hold (blocks of
    ``block`` consecutive tokens, the last one ragged), from the full attention map, one head at a time.
    """
    B, H, N, D = q.shape
    scale = D**-0.5 if scale is None else scale
    M = -(-N // block)
    # Sums by block as products with a one-hot [N, M] matrix (3x faster than index_add_ on one CPU thread).
    member = torch.nn.functional.one_hot(torch.arange(N, device=q.device) // block, M).float()
    rows = member.sum(0)
    out = torch.zeros(B, H, M, M, device=q.device)
    for b in range(B):
        for h in range(H):
            probs = torch.softmax((q[b, h].float() @ k[b, h].float().T) * scale, dim=-1)  # [N, N]
            out[b, h] = member.T @ (probs @ member) / rows[:, None]
    return out


def oracle_blocks(mass: torch.Tensor, density: float, forced: torch.Tensor) -> torch.Tensor:
    """Bool [..., M, M]: per query block the ``ceil(M * density)`` key blocks of most true mass.

    ``forced`` (bool [M, M]: text rows and columns) are kept first and count inside the budget, as
    v2's forced blocks do; a row forced whole stays dense.
    """
    M = mass.shape[-1]
    keep = max(1, -(-int(round(M * density * 1e6)) // 10**6))  # ceil without float noise
    ranked = mass.masked_fill(forced, float("inf"))
    top = ranked.topk(min(keep, M), dim=-1).indices
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True) | forced


def text_blocks(layout: VideoLayout, block: int, device=None) -> torch.Tensor:
    """Bool [M, M]: block pairs in a row or column holding a text token (attended whole, as in every mode)."""
    pos = torch.arange(layout.seq_len, device=device)
    text = (pos < layout.prefix) | (pos >= layout.prefix + layout.video_tokens)
    M = -(-layout.seq_len // block)
    held = torch.zeros(M, dtype=torch.bool, device=device)
    held[pos[text] // block] = True
    return held[:, None] | held[None, :]


def oracle_mask(q, k, layout: VideoLayout, density: float, block: int) -> torch.Tensor:
    """Bool [B, H, M, M]: the oracle block mask of ``density`` (blocks in the model's token order)."""
    return oracle_blocks(block_mass(q, k, block), density, text_blocks(layout, block, q.device))


def block_masked_attention(q, k, v, mask: torch.Tensor, block: int) -> torch.Tensor:
    """SDPA restricted to the block pairs of ``mask`` [B, H, M, M], one batch element at a time."""
    of = torch.arange(q.shape[-2], device=q.device) // block
    return torch.stack([
        torch.nn.functional.scaled_dot_product_attention(q[b], k[b], v[b], attn_mask=mask[b][:, of][:, :, of])
        for b in range(q.shape[0])
    ])
