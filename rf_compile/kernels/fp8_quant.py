"""FP8 (e4m3) copies of Q, K and V in each head's token order, for ``precision="fp8"`` attention.

One pass per tensor reads the rows of every head in its order (the permutation the bf16 TMA path
does in a separate copy is fused in) and writes them scaled into e4m3:

- Q and K: one scale per kernel block (``block`` consecutive positions), the block's absolute
  maximum over 448 (e4m3's largest finite value). K is first smoothed by its mean over the
  head's tokens: every score of a query row moves by the same ``q . mean``, which the softmax
  cancels, and K's large shared offset (common in video DiTs) no longer eats the scale.
- V: one scale per head (its absolute maximum over 448, computed by the caller), stored
  transposed, [B, H, D, N_pad], because Hopper's FP8 tensor-core product wants its second operand
  with the reduced dimension contiguous. Not per channel: the kernel would need a channel vector
  after its warp-specialised loop, and Triton 3.6 hands vectors that cross that loop to the wrong
  rows (benchmarks/results/nvidia-h200/NOTES.md, entry 5); a scalar crosses safely.

Outputs are padded to ``N_pad`` (a multiple of ``block``) with zero rows, so every tile is whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["FP8_MAX", "Fp8Copies", "quantize_for_attention"]

FP8_MAX = 448.0  # largest finite float8 e4m3 (torch.float8_e4m3fn)


@triton.jit
def _quantize_rows_kernel(
    X, X8, Scale, Shift, Orders, WhichOrder, VariantOfHead,
    stride_xb, stride_xh, stride_xm,
    H, N, N_pad, num_blocks,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr, TRANSPOSE: tl.constexpr,
):  # fmt: skip
    """Block ``blk`` of head ``bh`` in its order: Q/K rows with a block scale, or V rows (TRANSPOSE)
    with the caller's per-head scale."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    order = tl.load(WhichOrder + tl.load(VariantOfHead + bh)).to(tl.int64)
    pos = blk * BLOCK + tl.arange(0, BLOCK)
    live = pos < N
    rows = tl.load(Orders + order * N + pos, mask=live, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(base + rows[:, None] * stride_xm + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
    if SMOOTH:
        x = tl.where(live[:, None], x - tl.load(Shift + bh.to(tl.int64) * HEAD_DIM + d)[None, :], 0.0)
    if TRANSPOSE:
        x8 = (x / tl.load(Scale + bh)).to(tl.float8e4nv)  # per head, caller-made (> 0)
        out = X8 + bh.to(tl.int64) * HEAD_DIM * N_pad + d[None, :].to(tl.int64) * N_pad + pos[:, None]
        tl.store(out, x8)
    else:
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-30) / 448.0
        x8 = (x / scale).to(tl.float8e4nv)
        tl.store(X8 + (bh.to(tl.int64) * N_pad + pos[:, None]) * HEAD_DIM + d[None, :], x8)
        tl.store(Scale + bh.to(tl.int64) * num_blocks + blk, scale)


@dataclass
class Fp8Copies:
    """The e4m3 tensors and scales one attention call reads (all in each head's token order).

    ``q``/``k``: [B, H, N_pad, D] e4m3; ``v``: [B, H, D, N_pad] e4m3; ``q_scale`` [B*H, N_pad/block_m],
    ``k_scale`` [B*H, N_pad/block_n] and ``v_scale`` [B*H], fp32: x ~ x8 * scale (K less its mean).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    @property
    def n_pad(self) -> int:
        return self.q.shape[2]


def quantize_for_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    orders: torch.Tensor,
    q_order: torch.Tensor,
    kv_order: torch.Tensor,
    variant_of_head: torch.Tensor,
    block_m: int,
    block_n: int,
) -> Fp8Copies:
    """Quantize q, k, v [B, H, N, D] (unit stride along D) into e4m3 in each head's orders.

    ``orders`` int32 [O, N] token orders, ``q_order`` / ``kv_order`` int32 [P] the order of each
    plan variant, ``variant_of_head`` int32 [B, H]. Never reads device data on the host.
    """
    B, H, N, D = q.shape
    block = max(block_m, block_n)
    n_pad = triton.cdiv(N, block) * block
    device = q.device
    q8 = torch.empty(B, H, n_pad, D, dtype=torch.float8_e4m3fn, device=device)
    k8 = torch.empty(B, H, n_pad, D, dtype=torch.float8_e4m3fn, device=device)
    v8 = torch.empty(B, H, D, n_pad, dtype=torch.float8_e4m3fn, device=device)
    q_scale = torch.empty(B * H, n_pad // block_m, dtype=torch.float32, device=device)
    k_scale = torch.empty(B * H, n_pad // block_n, dtype=torch.float32, device=device)
    k_mean = k.float().mean(dim=2).contiguous()  # [B, H, D]; the order does not change a mean
    v_scale = (v.abs().amax(dim=(2, 3)).float().clamp_min(1e-30) / FP8_MAX).reshape(B * H).contiguous()
    voh = variant_of_head.contiguous()
    for x, x8, scale, which, blk, smooth, transpose in (
        (q, q8, q_scale, q_order, block_m, False, False),
        (k, k8, k_scale, kv_order, block_n, True, False),
        (v, v8, v_scale, kv_order, block_n, False, True),
    ):
        _quantize_rows_kernel[(n_pad // blk, B * H)](
            x, x8, scale, k_mean, orders, which, voh,
            x.stride(0), x.stride(1), x.stride(2),
            H, N, n_pad, n_pad // blk,
            HEAD_DIM=D, BLOCK=blk, SMOOTH=smooth, TRANSPOSE=transpose, num_warps=4,
        )  # fmt: skip
    return Fp8Copies(q8, k8, v8, q_scale, k_scale, v_scale)
