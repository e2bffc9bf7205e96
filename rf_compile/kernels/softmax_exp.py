"""The softmax's exponentials, part of them on the FMA units (``block_sparse_attention(exp2=...)``).

Why: a 128 x 128 score tile takes 16,384 ``exp2``; Hopper's MUFU unit does 16 a cycle per SM, 1,024
cycles a tile, as long as the bf16 products of that tile at head dim 64 (2 x 2 x 128 x 128 x 64 FLOP at
~4,096 a cycle). The FMA pipe (128 lanes a cycle) has room: FlashAttention-4 computes a share of the
exponentials with a polynomial there. ``exp2_poly`` is that polynomial: ``2^x = 2^j * 2^f`` with ``j`` the
nearest integer (a float add of 1.5 * 2^23 rounds it into the low mantissa bits, no conversion
instruction), ``2^f`` on [-1/2, 1/2] a cubic (relative error 7.5e-5, fitted here for minimax relative
error; bf16's P rounds at 3.9e-3), and ``2^j`` added into the exponent bits: 6 FMA-pipe and 3 integer
instructions a score (sm_90 SASS, Triton 3.6).

``exp2_mixed`` picks which scores take it without moving data between threads: Hopper's accumulator
layout gives a thread two adjacent key columns (``tl.split`` of the last dim of 2 stays in registers),
and rows ``r`` and ``r + 8`` of each 16-row group. ``SHARE`` 2: every odd column (half the scores); 4: the
odd columns of rows ``r + 8`` (a quarter); 0: none (the MUFU for every score). The offline sm_90 compile
shows no layout conversion or shared memory added (``benchmarks/kernel_resources.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from rf_compile.config import EXP2

__all__ = ["EXP2_SHARES", "exp2_mixed", "exp2_poly"]

# exp2= option -> SHARE of the scores computed by exp2_poly (its inverse: 2 = half, 4 = a quarter).
EXP2_SHARES = dict(zip(EXP2, (0, 2, 4), strict=True))

_ROUND = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + _ROUND holds round(x) in its low mantissa bits for |x| < 2^22
# 2^f ~ ((C3 f + C2) f + C1) f + C0 on [-1/2, 1/2], minimax in relative error (7.5e-5).
_C3 = tl.constexpr(0.0551716610789299)
_C2 = tl.constexpr(0.2426111400127411)
_C1 = tl.constexpr(0.6932609677314758)
_C0 = tl.constexpr(0.9999280571937561)


@triton.jit
def exp2_poly(x):
    """2^x for x <= 0 on the FMA and integer pipes; x below -126 gives 2^-126 (not 0: the caller feeds it
    scores less their row maximum, never -inf)."""
    x = tl.maximum(x, -126.0)
    t = x + _ROUND
    f = x - (t - _ROUND)  # in [-1/2, 1/2]
    p = ((_C3 * f + _C2) * f + _C1) * f + _C0
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)  # round(x) into the exponent
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def exp2_mixed(x, SHARE: tl.constexpr):
    """2^x of a [M, N] score tile (M a multiple of 16, N even), 1/SHARE of it by ``exp2_poly`` (0: none)."""
    if SHARE == 0:
        return tl.math.exp2(x)
    else:
        M: tl.constexpr = x.shape[0]
        N: tl.constexpr = x.shape[1]
        even, odd = tl.split(tl.reshape(x, [M, N // 2, 2]))
        if SHARE == 2:
            odd = exp2_poly(odd)
        else:  # rows r + 8 of each 16-row group: the same thread's second row
            upper, lower = tl.split(tl.permute(tl.reshape(odd, [M // 16, 2, 8, N // 2]), [0, 2, 3, 1]))
            both = tl.join(tl.math.exp2(upper), exp2_poly(lower))
            odd = tl.reshape(tl.permute(both, [0, 3, 1, 2]), [M, N // 2])
        return tl.reshape(tl.join(tl.math.exp2(even), odd), [M, N])
