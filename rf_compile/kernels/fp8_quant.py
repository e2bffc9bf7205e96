"""8-bit copies of Q, K and V in each head's token order, for ``precision="fp8"`` and ``"int8"`` attention.

One pass per tensor reads the rows of every head in its order (the permutation the bf16 TMA path
does in a separate copy is fused in) and writes them scaled into 8 bits:

- Q: one scale per query block (``block_m`` consecutive positions), the block's absolute maximum
  over the format's largest value (e4m3: 448; int8: 127).
- K: first smoothed by its mean over the head's tokens: every score of a query row moves by the
  same ``q . mean``, which the softmax cancels, and K's large shared offset (common in video DiTs)
  no longer eats the scale. e4m3 (``"fp8"``): one scale per key block. int8 (``"int8"``): one
  scale per head, so that the kernel's scores take no per-block factor inside its loop; a first
  launch finds each block's maximum, the head's scale is their maximum (an int8 grid is uniform:
  its precision is the scale's, and a per-block scale gained nothing on the trained models).
- V: e4m3 in both cases, one scale per head (its absolute maximum over 448, computed by the
  caller), stored transposed, [B, H, D, N_pad], because Hopper's 8-bit tensor-core product wants its
  second operand with the reduced dimension contiguous. Not per channel: the kernel would need a
  channel vector after its warp-specialised loop, and Triton 3.6 hands vectors that cross that loop
  to the wrong rows (benchmarks/results/nvidia-h200/NOTES.md, entry 5); a scalar crosses safely.

Why int8 for Q K^T: e4m3 keeps 3 mantissa bits, and the softmax turns a score's absolute error into
a relative error of its weight; int8's uniform grid is finer than e4m3's for values above about a
quarter of the scale's range (9x at its top), the ones that make the large scores (SageAttention's
split: int8 Q K^T, fp8 P V). On the trained fidelity models' q/k/v, float
emulation: relative L2 error of the attention output 0.031 / 0.041 (Wan / CogVideoX) with e4m3
Q K^T, 0.012 / 0.015 with int8, of which 0.011 / 0.013 is P V's e4m3
(``benchmarks/results/cpu/fp8_error/``).

Outputs are padded to ``N_pad`` (a multiple of ``block``) with zero rows, so every tile is whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["FP8_MAX", "QuantizedCopies", "quantize_for_attention"]

FP8_MAX = 448.0  # largest finite float8 e4m3 (torch.float8_e4m3fn)


@triton.jit
def _quantize_rows_kernel(
    X, X8, Scale, Shift, Orders, WhichOrder, VariantOfHead,
    stride_xb, stride_xh, stride_xm,
    H, N, N_pad, num_blocks,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr, TRANSPOSE: tl.constexpr,
    HEAD_SCALE: tl.constexpr, STORE: tl.constexpr, INT8: tl.constexpr,
):  # fmt: skip
    """Block ``blk`` of head ``bh`` in its order, less ``Shift`` (SMOOTH), scaled into e4m3 or int8.

    ``HEAD_SCALE``: by the caller's per-head scale (``Scale[bh]``, > 0), else by the block's own
    maximum, stored in ``Scale[bh, blk]``; ``STORE`` False writes that scale alone (no copy);
    ``TRANSPOSE``: the copy is written [D, N_pad] per head."""
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
    if HEAD_SCALE:
        scale = tl.load(Scale + bh)
    else:
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-30) / (127.0 if INT8 else 448.0)
        tl.store(Scale + bh.to(tl.int64) * num_blocks + blk, scale)
    if STORE:
        y = x / scale
        if INT8:  # round half away from zero (the cast truncates); |y| <= 127 by the scale
            x8 = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
        else:
            x8 = y.to(tl.float8e4nv)
        if TRANSPOSE:
            tl.store(X8 + bh.to(tl.int64) * HEAD_DIM * N_pad + d[None, :].to(tl.int64) * N_pad + pos[:, None], x8)
        else:
            tl.store(X8 + (bh.to(tl.int64) * N_pad + pos[:, None]) * HEAD_DIM + d[None, :], x8)


@dataclass
class QuantizedCopies:
    """The 8-bit tensors and scales one attention call reads (all in each head's token order).

    ``q``/``k``: [B, H, N_pad, D], e4m3 or int8 (``qk_int8``); ``v``: [B, H, D, N_pad] e4m3; fp32
    scales ``q_scale`` [B*H, N_pad/block_m], ``k_scale`` [B*H, N_pad/block_n] (e4m3) or [B*H]
    (int8), ``v_scale`` [B*H]: x ~ x8 * scale (K less its mean).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    @property
    def qk_int8(self) -> bool:
        return self.q.dtype == torch.int8

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
    qk_int8: bool = False,
) -> QuantizedCopies:
    """Quantize q, k, v [B, H, N, D] (unit stride along D) into 8 bits in each head's orders.

    ``orders`` int32 [O, N] token orders, ``q_order`` / ``kv_order`` int32 [P] the order of each
    plan variant, ``variant_of_head`` int32 [B, H]; ``qk_int8``: q and k in int8 (else e4m3).
    Never reads device data on the host.
    """
    B, H, N, D = q.shape
    block = max(block_m, block_n)
    n_pad = triton.cdiv(N, block) * block
    device = q.device
    qk_dtype = torch.int8 if qk_int8 else torch.float8_e4m3fn
    q8 = torch.empty(B, H, n_pad, D, dtype=qk_dtype, device=device)
    k8 = torch.empty(B, H, n_pad, D, dtype=qk_dtype, device=device)
    v8 = torch.empty(B, H, D, n_pad, dtype=torch.float8_e4m3fn, device=device)
    q_scale = torch.empty(B * H, n_pad // block_m, dtype=torch.float32, device=device)
    k_scale = torch.empty(B * H, n_pad // block_n, dtype=torch.float32, device=device)
    k_mean = k.float().mean(dim=2).contiguous()  # [B, H, D]; the order does not change a mean
    v_scale = (v.abs().amax(dim=(2, 3)).float().clamp_min(1e-30) / FP8_MAX).reshape(B * H).contiguous()
    voh = variant_of_head.contiguous()

    def launch(x, x8, scale, which, blk, smooth=False, transpose=False, head_scale=False, store=True, int8=False):
        _quantize_rows_kernel[(n_pad // blk, B * H)](
            x, x8, scale, k_mean, orders, which, voh,
            x.stride(0), x.stride(1), x.stride(2),
            H, N, n_pad, n_pad // blk,
            HEAD_DIM=D, BLOCK=blk, SMOOTH=smooth, TRANSPOSE=transpose, HEAD_SCALE=head_scale, STORE=store,
            INT8=int8, num_warps=4,
        )  # fmt: skip

    launch(q, q8, q_scale, q_order, block_m, int8=qk_int8)
    if qk_int8:  # the blocks' maxima first, then one scale per head
        launch(k, k8, k_scale, kv_order, block_n, smooth=True, store=False, int8=True)
        k_scale = k_scale.amax(dim=1).contiguous()
        launch(k, k8, k_scale, kv_order, block_n, smooth=True, head_scale=True, int8=True)
    else:
        launch(k, k8, k_scale, kv_order, block_n, smooth=True)
    launch(v, v8, v_scale, kv_order, block_n, transpose=True, head_scale=True)
    return QuantizedCopies(q8, k8, v8, q_scale, k_scale, v_scale)
