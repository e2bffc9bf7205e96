"""Triton kernel of the ARM's sampled recall: softmax mass inside nested bands, never materialised.

For one sample (the first frame, or every omega-th video token) of ``S`` tokens, each at a
position in the pattern's token order, it computes per (batch, head) and bandwidth the mean over
query rows of ``sum_{|pos_i - pos_j| <= w} softmax(q_i k^T * scale)_j``. One pass with an online
softmax: the row max rescales the total and every in-band sum together, so the S x S score
matrix is never written to memory (the PyTorch version in ``ops.arm`` writes it, in fp32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rf_compile.persistent import persistent


@triton.jit
def _band_recall_kernel(
    Q, K, Halfwidths, Out, Enabled,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    H, S, position_step, qk_scale,
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
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_ptrs += rows[:, None].to(tl.int64) * stride_qs + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(rows[:, None] < S) & (d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:  # the interpreter computes low-precision dots wrongly
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    band = tl.arange(0, NB_PAD)
    halfwidths = tl.load(Halfwidths + band, mask=band < NB, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    inside = tl.zeros([BLOCK_M, NB_PAD], tl.float32)
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + cols[None, :].to(tl.int64) * stride_ks + d[:, None] * stride_kd
        k = tl.load(k_ptrs, mask=(cols[None, :] < S) & (d[:, None] < HEAD_DIM), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        # -- scores, in log2 units (qk_scale includes log2(e)) --
        s = tl.dot(q, k) * qk_scale
        s = tl.where(cols[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        inside = inside * alpha[:, None]
        distance = tl.abs(rows[:, None] - cols[None, :]) * position_step
        for i in tl.static_range(NB):
            width = tl.sum(tl.where(band == i, halfwidths, 0))
            mass = tl.sum(tl.where(distance <= width, p, 0.0), 1)
            inside += tl.where(band[None, :] == i, mass[:, None], 0.0)
        m_i = m_new
    recall = tl.where(rows[:, None] < S, inside / l_i[:, None], 0.0)
    tl.store(Out + (pid_bh * tl.num_programs(0) + pid_m) * NB_PAD + band, tl.sum(recall, 0), mask=band < NB)


@functools.lru_cache(maxsize=64)
def _device_ints(values: tuple[int, ...], device: str) -> torch.Tensor:
    """A small int32 tensor on the device, made once (a fresh host-to-device copy would sync), outside
    CUDA-graph pools (it outlives the call)."""
    return persistent(lambda: torch.tensor(values, dtype=torch.int32, device=device), device)


def band_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    position_step: int,
    halfwidths: list[int],
    scale: float,
    enabled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean in-band softmax mass per (batch, head, band) of sampled tokens, float32 [B, H, len(halfwidths)].

    Parameters
    ----------
    q, k: [B, H, S, D]
        Sampled queries and keys (any strides: a strided slice of the full tensors is fine).
    position_step:
        Distance in the pattern's token order between consecutive samples.
    halfwidths:
        Band half-widths in tokens of that order.
    enabled:
        Optional bool scalar on the device: when False the kernel returns at once and the result
        is zeros (the caller keeps its previous decision). Never read on the host.
    """
    assert q.shape == k.shape and q.dim() == 4, f"q and k must be [B, H, S, D], got {q.shape}, {k.shape}"
    B, H, S, D = q.shape
    nb = len(halfwidths)
    block_m, block_n = (128, 64) if q.is_cuda else (64, 32)
    grid = (triton.cdiv(S, block_m), B * H)
    partial = torch.zeros(B * H, grid[0], triton.next_power_of_2(nb), device=q.device, dtype=torch.float32)
    widths = _device_ints(tuple(halfwidths), str(q.device))
    flag = widths if enabled is None else enabled.to(torch.int32)
    _band_recall_kernel[grid](
        q, k, widths, partial, flag,
        *q.stride(), *k.stride(),
        H, S, position_step, scale * 1.44269504,  # log2(e): the kernel uses exp2
        NB=nb, NB_PAD=triton.next_power_of_2(nb), HEAD_DIM=D, D_PAD=triton.next_power_of_2(D),
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=not q.is_cuda, HAS_ENABLED=enabled is not None,
        num_warps=8 if q.is_cuda else 4,
    )  # fmt: skip
    return (partial.sum(1)[:, :nb] / S).view(B, H, nb)
