"""Triton kernels of the ARM: softmax mass inside nested bands of two samples, and the decision.

A sample is ``S`` tokens of q/k, ordered by their position in a pattern's token order (the first
frame for the temporal mask, every omega-th video token for the spatial one). ``_band_recall_kernel``
computes, for every ``row_stride``-th token as a query against all ``S`` keys, the in-band share
``sum_{|i - j| <= W} softmax(q_i k^T * scale)_j`` of each band, in one pass with an online softmax
(the row max rescales the total and every in-band sum together), so the S x S scores are never
written (the PyTorch version in ``ops.arm`` writes them, in fp32). Both samples run in one launch;
``_choose_kernel`` then sums the per-block partials into recalls and applies Algorithm 1's choice,
so the whole ARM is two launches (the small torch ops it replaces cost ~3-5 us of device time each).

Bands are tested per tile before per element: in a [BLOCK_M x BLOCK_N] tile the smallest and
largest ``|i - j|`` sit at its corners, so a tile is wholly inside a band (its mass is the row sum
the softmax needs anyway), wholly outside (nothing to add) or straddles the band's edge, and only
then pays the element mask. The conditions are program-uniform scalars, so no warp diverges.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rf_compile.persistent import persistent


@triton.jit
def _band_recall_kernel(
    Q, K, Widths, Partial, Enabled,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    H, blocks0,
    start0, stride0, S0, rows_stride0,
    start1, stride1, S1, rows_stride1,
    qk_scale,
    NB: tl.constexpr, NB_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, HAS_ENABLED: tl.constexpr,
):  # fmt: skip
    if HAS_ENABLED:  # the decision to run is made on the device (arm_every, dense warm-up)
        if tl.load(Enabled) == 0:
            return
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    # -- the sample of this program's rows: blocks [0, blocks0) of the first, the rest of the second --
    second = pid_m >= blocks0
    block = tl.where(second, pid_m - blocks0, pid_m)
    start = tl.where(second, start1, start0)
    stride = tl.where(second, stride1, stride0)
    S = tl.where(second, S1, S0)
    r = tl.where(second, rows_stride1, rows_stride0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows; row i is sample token i * r
    q_pos = rows * r
    d = tl.arange(0, D_PAD)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + d[None, :] * stride_qd
    q_ptrs += (start + q_pos[:, None].to(tl.int64) * stride) * stride_qs
    q = tl.load(q_ptrs, mask=(q_pos[:, None] < S) & (d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:  # the interpreter computes low-precision dots wrongly
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + d[:, None] * stride_kd
    band = tl.arange(0, NB_PAD)
    widths = Widths + second.to(tl.int32) * NB  # band half-widths in sample positions
    q_lo = block * BLOCK_M * r  # the tile's first and last query positions (ragged rows included)
    q_hi = q_lo + (BLOCK_M - 1) * r

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # raw scores (qk_scale > 0 keeps the order)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    inside = tl.zeros([BLOCK_M, NB_PAD], tl.float32)
    for k_lo in range(0, S, BLOCK_N):
        cols = k_lo + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + (start + cols[None, :].to(tl.int64) * stride) * stride_ks
        k = tl.load(k_ptrs, mask=(cols[None, :] < S) & (d[:, None] < HEAD_DIM), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        # -- softmax terms, in log2 units (qk_scale includes log2(e)) --
        s = tl.dot(q, k)
        if k_lo + BLOCK_N > S:  # the ragged last tile
            s = tl.where(cols[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * qk_scale)
        p = tl.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
        row_mass = tl.sum(p, 1)
        l_i = l_i * alpha + row_mass
        inside = inside * alpha[:, None]
        # -- bands: smallest and largest |query - key| of the tile, from its corners --
        k_hi = k_lo + BLOCK_N - 1
        d_min = tl.maximum(tl.maximum(k_lo - q_hi, q_lo - k_hi), 0)
        d_max = tl.maximum(q_hi - k_lo, k_hi - q_lo)
        for i in tl.static_range(NB):
            width = tl.load(widths + i)
            if d_min <= width:  # some of the tile is in band i
                if d_max <= width:  # all of it
                    mass = row_mass
                else:  # the tile straddles the band's edge: the element mask
                    mass = tl.sum(tl.where(tl.abs(q_pos[:, None] - cols[None, :]) <= width, p, 0.0), 1)
                inside += tl.where(band[None, :] == i, mass[:, None], 0.0)
        m_i = m_new
    recall = tl.where(q_pos[:, None] < S, inside / l_i[:, None], 0.0)
    tl.store(Partial + (pid_bh * tl.num_programs(0) + pid_m) * NB_PAD + band, tl.sum(recall, 0))


@triton.jit
def _choose_kernel(
    Partial, Recalls, Variant, Recall, Enabled,
    blocks0, blocks, rows0, rows1, threshold,
    NB: tl.constexpr, NB_PAD: tl.constexpr, BLOCK_P: tl.constexpr, HAS_ENABLED: tl.constexpr,
):  # fmt: skip
    """Per (batch, head): recalls from the partials, then Algorithm 1 (``ops.arm.choose_variants``)."""
    pid = tl.program_id(0)
    band = tl.arange(0, NB_PAD)
    on = True
    if HAS_ENABLED:  # skipped: recalls 0, so textural (the caller keeps its previous decision)
        on = tl.load(Enabled) != 0
    sum_t = tl.zeros([NB_PAD], tl.float32)
    sum_s = tl.zeros([NB_PAD], tl.float32)
    for lo in range(0, blocks, BLOCK_P):
        index = lo + tl.arange(0, BLOCK_P)
        ptrs = Partial + (pid * blocks + index[:, None]) * NB_PAD + band[None, :]
        part = tl.load(ptrs, mask=(index[:, None] < blocks) & on, other=0.0)
        sum_t += tl.sum(tl.where(index[:, None] < blocks0, part, 0.0), 0)
        sum_s += tl.sum(tl.where(index[:, None] >= blocks0, part, 0.0), 0)
    recall_t = sum_t / rows0
    recall_s = sum_s / rows1
    tl.store(Recalls + pid * 2 * NB + band, recall_t, mask=band < NB)
    tl.store(Recalls + pid * 2 * NB + NB + band, recall_s, mask=band < NB)
    # -- temporal first, then spatial, each at its smallest bandwidth reaching the threshold --
    first_t = tl.min(tl.where((recall_t >= threshold) & (band < NB), band, NB))
    first_s = tl.min(tl.where((recall_s >= threshold) & (band < NB), band, NB))
    at_t = tl.sum(tl.where(band == first_t, recall_t, 0.0))
    at_s = tl.sum(tl.where(band == first_s, recall_s, 0.0))
    variant = tl.where(first_t < NB, NB + first_t, tl.where(first_s < NB, first_s, 2 * NB))
    chosen = tl.where(first_t < NB, at_t, tl.where(first_s < NB, at_s, float("nan")))
    tl.store(Variant + pid, variant.to(tl.int64))
    tl.store(Recall + pid, chosen)


@functools.lru_cache(maxsize=64)
def _device_ints(values: tuple[int, ...], device: str) -> torch.Tensor:
    """A small int32 tensor on the device, made once (a fresh host-to-device copy would sync), outside
    CUDA-graph pools (it outlives the call)."""
    return persistent(lambda: torch.tensor(values, dtype=torch.int32, device=device), device)


def launch_shape(q: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the recall kernel.

    BLOCK_M = 64 rather than 128 on CUDA: a tile's query rows span BLOCK_M * row_stride sample
    positions, and the tiles that straddle a band's edge (the only ones paying the element mask)
    are about 2 (BLOCK_M * row_stride + BLOCK_N) / S of a row of tiles per band. Chosen by that
    count, not yet by a measurement. Compiled offline for sm_90 (Triton 3.7, three bands): 92
    registers at head dim 64, 198 at 128, no spills. The interpreter takes small tiles, so that
    tests see every tile class at small sizes.
    """
    return (64, 64, 4) if q.is_cuda else (16, 16, 1)


class Decision(NamedTuple):
    """The ARM's result per (batch, head)."""

    recalls: torch.Tensor  # float32 [B, H, 2, nb]: temporal, spatial
    variant: torch.Tensor  # int64 [B, H], ``rf_compile.plan.variants_for`` order
    recall: torch.Tensor  # float32 [B, H]: recall of the chosen mask, NaN for textural


def band_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    samples: Sequence[tuple[int, int, int, int, int]],
    halfwidths: Sequence[int],
    scale: float,
    threshold: float,
    enabled: torch.Tensor | None = None,
) -> Decision:
    """Sampled recalls of the temporal and spatial bands, and the variant Algorithm 1 picks from them.

    Parameters
    ----------
    q, k: [B, H, N, D]
        Queries and keys holding both samples (any strides).
    samples:
        (temporal, spatial), each ``(start, stride, count, position_step, row_stride)``: ``count``
        tokens ``stride`` apart from ``start`` along N, ``position_step`` apart in the pattern's
        order; every ``row_stride``-th of them is a query row (all are keys).
    halfwidths:
        Band half-widths in tokens of the pattern's order, ascending.
    threshold:
        Recall a band must reach to be chosen.
    enabled:
        Optional bool scalar on the device: when False the kernels skip their work and the recalls
        are zeros (the caller keeps its previous decision). Never read on the host.
    """
    assert q.shape == k.shape and q.dim() == 4, f"q and k must be [B, H, N, D], got {q.shape}, {k.shape}"
    assert len(samples) == 2, f"the ARM has a temporal and a spatial sample, got {len(samples)}"
    assert scale > 0, f"the kernel keeps raw score maxima, so the scale must be positive, got {scale}"
    B, H, N, D = q.shape
    for start, stride, count, _, _ in samples:
        assert 0 <= start and start + (count - 1) * stride < N, f"sample {start}+{stride}*[0, {count}) outside N={N}"
    nb, nb_pad = len(halfwidths), triton.next_power_of_2(len(halfwidths))
    block_m, block_n, warps = launch_shape(q)
    rows = [-(-count // row_stride) for _, _, count, _, row_stride in samples]
    blocks0, blocks1 = (triton.cdiv(n, block_m) for n in rows)
    grid = (blocks0 + blocks1, B * H)
    widths = _device_ints(tuple(w // sample[3] for sample in samples for w in halfwidths), str(q.device))
    partial = torch.empty(B * H, grid[0], nb_pad, device=q.device, dtype=torch.float32)
    flag = widths if enabled is None else enabled
    (start0, stride0, S0, _, r0), (start1, stride1, S1, _, r1) = samples
    _band_recall_kernel[grid](
        q, k, widths, partial, flag,
        *q.stride(), *k.stride(),
        H, blocks0,
        start0, stride0, S0, r0,
        start1, stride1, S1, r1,
        scale * 1.44269504,  # log2(e): the kernel uses exp2
        NB=nb, NB_PAD=nb_pad, HEAD_DIM=D, D_PAD=triton.next_power_of_2(D),
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=not q.is_cuda, HAS_ENABLED=enabled is not None,
        num_warps=warps,
    )  # fmt: skip
    recalls = torch.empty(B, H, 2, nb, device=q.device, dtype=torch.float32)
    variant = torch.empty(B, H, device=q.device, dtype=torch.int64)
    recall = torch.empty(B, H, device=q.device, dtype=torch.float32)
    _choose_kernel[(B * H,)](
        partial, recalls, variant, recall, flag,
        blocks0, grid[0], rows[0], rows[1], float(threshold),
        NB=nb, NB_PAD=nb_pad, BLOCK_P=min(triton.next_power_of_2(grid[0]), 64), HAS_ENABLED=enabled is not None,
    )  # fmt: skip
    return Decision(recalls, variant, recall)
