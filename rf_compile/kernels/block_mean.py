"""Triton kernel of RainFusion 2.0's block means: average Q or K over each kernel block of a token order.

One program per (block, batch x head) gathers the block's rows through the order table and
writes their fp32 mean, so Q and K are read exactly once (a dense averaging matmul would do
``blocks`` times the work, and a gathered copy would write the tensor again). The output may have
any strides: v2 writes the key means as [B, H, D, M] memory, which the block selection reads along M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_mean_kernel(
    X, Order, Out,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    pos = m * BLOCK + tl.arange(0, BLOCK)
    live = pos < N
    rows = tl.load(Order + pos, mask=live, other=0)
    d = tl.arange(0, D_PAD)
    ptrs = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    ptrs += rows[:, None].to(tl.int64) * stride_xn + d[None, :] * stride_xd
    x = tl.load(ptrs, mask=live[:, None] & (d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    count = tl.minimum(N - m * BLOCK, BLOCK)
    mean = tl.sum(x, 0) / count
    out = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m.to(tl.int64) * stride_om
    tl.store(out + d * stride_od, mean, mask=d < HEAD_DIM)


def block_means(x: torch.Tensor, order: torch.Tensor, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` [B, H, N, D] over each ``block`` consecutive positions of ``order`` -> fp32 [B, H, M, D].

    ``order[p]`` is the original index of the token at position ``p`` (int32 or int64, on x's device).
    ``out``: where to write, a float32 [B, H, M, D] tensor of any strides (default: a new contiguous one).
    """
    assert x.dim() == 4 and order.shape == (x.shape[2],), f"x must be [B, H, N, D] and order [N], got {x.shape}"
    B, H, N, D = x.shape
    blocks = triton.cdiv(N, block)
    if out is None:
        out = torch.empty(B, H, blocks, D, device=x.device, dtype=torch.float32)
    assert out.shape == (B, H, blocks, D) and out.dtype == torch.float32, f"out must be float32 {(B, H, blocks, D)}"
    _block_mean_kernel[(blocks, B * H)](
        x, order, out, *x.stride(), *out.stride(), H, N, BLOCK=block, HEAD_DIM=D, D_PAD=triton.next_power_of_2(D)
    )
    return out
