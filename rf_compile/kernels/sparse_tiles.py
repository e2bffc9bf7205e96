"""Tile movement of the block-sparse attention kernel: the row-permuting copy kernel, the K/V tile
loads (TMA descriptors or gathered pointers, FP8's transposed V) and the output tile's destination.

Not here: the attention loop that uses them (``sparse_loop``) and the launcher (``block_sparse``).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_kv", "out_tile", "permute_rows_kernel"]


@triton.jit
def permute_rows_kernel(
    X, XP, Orders, WhichOrder, VariantOfHead,
    stride_xb, stride_xh, stride_xm,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, INVERSE: tl.constexpr,
):
    """XP[b, h, pos] = X[b, h, orders[o, pos]] for heads whose order o is not the identity;
    ``INVERSE``: X[b, h, orders[o, pos]] = XP[b, h, pos] (output rows back to their positions)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    variant = tl.load(VariantOfHead + bh)
    order = tl.load(WhichOrder + variant)
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    live = (pos < N) & (order != 0)  # identity heads move nothing: the kernel reads X in place
    rows = tl.load(Orders + order.to(tl.int64) * N + pos, mask=live, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    base = b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    original = X + base + rows[:, None] * stride_xm + d[None, :]
    permuted = XP + base + pos.to(tl.int64)[:, None] * stride_xm + d[None, :]
    if INVERSE:
        tl.store(original, tl.load(permuted, mask=live[:, None]), mask=live[:, None])
    else:
        tl.store(permuted, tl.load(original, mask=live[:, None]), mask=live[:, None])


@triton.jit
def load_kv(
    K_desc, V_desc, K_head, V_head, Orders, kv_order, Bias_row,
    kb, N, stride_km, stride_vm,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, FP8: tl.constexpr,
):
    """K, V tiles [BLOCK_N, HEAD_DIM] of key block kb, the key positions and their bias (log2 units).
    ``FP8``: V is stored transposed ([D, N_pad], see ``fp8_quant``) and its tile read as [D, BLOCK_N]."""
    k_pos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if EVEN_N:
        k_rows = tl.load(Orders + kv_order * N + k_pos)
    else:
        k_rows = tl.load(Orders + kv_order * N + k_pos, mask=k_pos < N, other=0)
    if USE_TMA:
        k = K_desc.load([kb * BLOCK_N, 0])
        if FP8:
            v = tl.trans(V_desc.load([0, kb * BLOCK_N]))
        else:
            v = V_desc.load([kb * BLOCK_N, 0])
    else:
        k_off = k_rows.to(tl.int64)
        if EVEN_N:
            k = tl.load(K_head + k_off[:, None] * stride_km + d[None, :])
            v = tl.load(V_head + k_off[:, None] * stride_vm + d[None, :])
        else:
            k = tl.load(K_head + k_off[:, None] * stride_km + d[None, :], mask=(k_pos < N)[:, None], other=0.0)
            v = tl.load(V_head + k_off[:, None] * stride_vm + d[None, :], mask=(k_pos < N)[:, None], other=0.0)
    if HAS_BIAS:
        bias = tl.load(Bias_row + k_rows, mask=k_pos < N, other=0.0) * 1.44269504  # log2(e)
    else:
        bias = k_pos  # unused placeholder
    return k, v, k_pos, bias


@triton.jit
def out_tile(Out, OP, b, h, q_order, stride_ob, stride_oh, stride_om, N,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr):
    """This head's output base and, with TMA, its tile descriptor: identity heads write ``Out``,
    permuted ones ``OP`` (the launcher puts those rows back)."""
    o_head = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if USE_TMA:
        o_head = tl.where(q_order != 0, OP + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, o_head)
        o_desc = tl.make_tensor_descriptor(o_head, shape=[N, HEAD_DIM], strides=[stride_om, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
    else:
        o_desc = o_head  # unused placeholder
    return o_head, o_desc
