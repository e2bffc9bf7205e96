"""Tile movement of the block-sparse attention kernel: the row-permuting copy kernel, the K/V tile
loads (TMA descriptors or gathered pointers, FP8's transposed V) and the output tile's destination.

TMA descriptors come two ways (``HOST_DESC``). Made in the program (``tl.make_tensor_descriptor``), one per
head's (N, D) matrix, each costing the program a descriptor write and a GPU-scope fence pair before its first
load. Or made once a launch on the host (``paired_descriptor``): one 5-D descriptor over a tensor and its
row-permuted scratch copy, (source, B, H, N, D), where ``source`` picks the tensor (its stride is the distance
between the two allocations); a program then only computes coordinates.

Not here: the attention loop that uses them (``sparse_loop``) and the launcher (``block_sparse``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["HOST_DESCRIPTOR_ARGS", "host_descriptors", "load_kv", "out_tile", "paired_descriptor",
           "permute_rows_kernel", "source_index", "tile_load", "tile_store"]

# The attention kernel's arguments that ``host_descriptors`` fills, in the kernel's order: the descriptors, then
# the pair codes of Q, K, V and the output.
HOST_DESCRIPTOR_ARGS = ("QDesc", "KDesc", "VDesc", "ODesc", "LseDesc", "QSrc", "KSrc", "VSrc", "OSrc")

# cuTensorMapEncodeTiled's bound on a stride in bytes: the most a tensor and its scratch copy may lie apart.
_TMA_MAX_STRIDE_BYTES = 2 ** 40


def paired_descriptor(x: torch.Tensor, xp: torch.Tensor, rows: int) -> tuple[TensorDescriptor, int] | None:
    """One TMA descriptor over the (B, H, R, C) tensor ``x`` and its scratch copy ``xp`` (same strides): a 5-D
    (source, B, H, rows, C) view whose ``source`` step is the distance between the two, from the lower one; and
    the pair code ``source_index`` reads (0: ``x`` at source 0, 1: ``xp`` there, 2: one tensor).
    Its block shape is the configuration's (``sparse_config.descriptor_blocks``). None where TMA cannot stride
    that far (2^40 bytes) or the distance is not a whole number of 16-byte steps."""
    B, H, _, C = x.shape
    size = x.element_size()
    gap = xp.data_ptr() - x.data_ptr()
    if gap == 0:  # one tensor (8-bit copies are every head's input): a single source
        base, code, step, sources = x, 2, 16 // size, 1
    elif abs(gap) >= _TMA_MAX_STRIDE_BYTES or gap % 16:
        return None
    else:
        base, code = (x, 0) if gap > 0 else (xp, 1)
        step, sources = abs(gap) // size, 2
    return TensorDescriptor(base, [sources, B, H, rows, C], [step, *x.stride()], [1, 1, 1, 16, 16]), code


def host_descriptors(tensors: tuple, lse: torch.Tensor | None, N: int, block_m: int, fp8: bool) -> dict | None:
    """The kernel's host-made descriptors and pair codes (``paired_descriptor``) for ``_launch``'s ``tensors``, and
    the log-sum-exp buffer's of ``loop="two_pass"``; None if a pair cannot share one. FP8's V is stored transposed
    ([D, n_pad] a head)."""
    q, k, v, qp, kp, vp, out, op = tensors[:8]
    pairs = {"Q": (q, qp, N), "K": (k, kp, N), "V": (v, vp, v.shape[-2] if fp8 else N), "O": (out, op, N)}
    made = {name: paired_descriptor(x, xp, rows) for name, (x, xp, rows) in pairs.items()}
    if any(m is None for m in made.values()):
        return None
    lse_desc = made["Q"][0] if lse is None else TensorDescriptor(lse, [lse.numel()], [1], [block_m])  # or unused
    return {**{f"{name}Desc": desc for name, (desc, _) in made.items()},
            **{f"{name}Src": code for name, (_, code) in made.items()}, "LseDesc": lse_desc}


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
def source_index(pair_code, order):
    """Which tensor of a host descriptor's pair a head reads (``paired_descriptor``'s code: 0, the
    tensor at index 0 and its scratch at 1; 1, the reverse; 2, one tensor), from the head's token order (0: the
    identity, read in place). A select, not an ``if``: warp specialisation needs the coordinates straight-line."""
    return tl.where(order != 0, pair_code == 0, pair_code == 1).to(tl.int32)


@triton.jit
def tile_load(desc, src, b, h, row, col, ROWS: tl.constexpr, COLS: tl.constexpr, HOST_DESC: tl.constexpr):
    """The [ROWS, COLS] tile at (row, col) of one head's matrix: ``desc`` is that head's device-made 2-D
    descriptor, or (``HOST_DESC``) the host-made 5-D one, with the head at (src, b, h)."""
    if HOST_DESC:
        return desc.load([src, b, h, row, col]).reshape(ROWS, COLS)
    else:
        return desc.load([row, col])


@triton.jit
def tile_store(desc, src, b, h, row, tile, ROWS: tl.constexpr, COLS: tl.constexpr, HOST_DESC: tl.constexpr):
    """``tile_load``'s store: ``tile`` [ROWS, COLS] to rows ``row`` of one head's matrix."""
    if HOST_DESC:
        desc.store([src, b, h, row, 0], tile.reshape(1, 1, 1, ROWS, COLS))
    else:
        desc.store([row, 0], tile)


@triton.jit
def load_kv(
    K_desc, V_desc, K_head, V_head, Orders, kv_order, Bias_row,
    kb, N, stride_km, stride_vm, k_src, v_src, b, h,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, FP8: tl.constexpr, HOST_DESC: tl.constexpr,
):
    """K, V tiles [BLOCK_N, HEAD_DIM] of key block kb, the key positions and their bias (log2 units).
    ``FP8``: V is stored transposed ([D, N_pad], see ``fp8_quant``) and its tile read as [D, BLOCK_N].
    ``k_src``, ``v_src``, ``b``, ``h``: the head's coordinates in host-made descriptors (``tile_load``)."""
    k_pos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if EVEN_N:
        k_rows = tl.load(Orders + kv_order * N + k_pos)
    else:
        k_rows = tl.load(Orders + kv_order * N + k_pos, mask=k_pos < N, other=0)
    if USE_TMA:
        k = tile_load(K_desc, k_src, b, h, kb * BLOCK_N, 0, BLOCK_N, HEAD_DIM, HOST_DESC)
        if FP8:
            v = tl.trans(tile_load(V_desc, v_src, b, h, 0, kb * BLOCK_N, HEAD_DIM, BLOCK_N, HOST_DESC))
        else:
            v = tile_load(V_desc, v_src, b, h, kb * BLOCK_N, 0, BLOCK_N, HEAD_DIM, HOST_DESC)
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
def out_tile(Out, OP, ODesc, b, h, q_order, stride_ob, stride_oh, stride_om, N,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr):
    """This head's output base and, with TMA, its tile descriptor: identity heads write ``Out``,
    permuted ones ``OP`` (the launcher puts those rows back). ``HOST_DESC``: ``ODesc``, made on the host
    over both (``tile_store`` with the head's ``source_index`` picks the tensor)."""
    o_head = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if HOST_DESC:
        o_desc = ODesc
    elif USE_TMA:
        o_head = tl.where(q_order != 0, OP + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, o_head)
        o_desc = tl.make_tensor_descriptor(o_head, shape=[N, HEAD_DIM], strides=[stride_om, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
    else:
        o_desc = o_head  # unused placeholder
    return o_head, o_desc
