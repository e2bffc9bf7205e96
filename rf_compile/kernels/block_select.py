"""Triton kernel of RainFusion 2.0's block selection: pooled scores -> softmax -> top-k / mass -> block lists.

One pass from the block means to the plan: per (plan, tile of query blocks) it scores the pooled
queries against every pooled key block, takes the softmax over key blocks, selects key blocks
(``select_blocks`` of ``ops.v2``: top-k count, or the cumulative-mass prefix of the top-k), ORs in the
forced blocks (text / sink rows and columns, the diagonal) and the dense warm-up flag, and writes
``kv_num_blocks``, ``kv_indices`` (ascending, padded with 0) and ``block_full`` directly. No
[plans, M, M] float tensor is written; the PyTorch path writes three (scores, scaled scores, softmax),
bool and int8 masks of that size, and sorts every row (int64 indices).

Design
------
Grid ``(cdiv(M, BLOCK_Q), plans)``: a program holds the fp32 probabilities of ``BLOCK_Q`` query blocks
against all ``M_PAD`` (next power of two of M) key blocks in registers, ``BLOCK_Q * M_PAD <= 16384``
values (32 per thread at 16 warps), never a [M, D] tile: scores are ``tl.dot`` of the [BLOCK_Q, BLOCK_D]
pooled queries with [BLOCK_D, M_PAD] slices of the pooled keys, accumulated over the head dim in fp32
(``input_precision="ieee"``, as the PyTorch path's fp32 matmul; TF32 would change the selection near
ties). A tile of query blocks rather than one row: ``tl.dot`` needs 16 rows, and each program reads
the plan's pooled keys (M x D x 4 bytes, from L2) once for ``BLOCK_Q`` rows.

Selection is exact on the probabilities without sorting. The bits of a non-negative float32 order
like its value, so a bisection over int32 bit patterns (30 steps cover [0, bits(1.0)]) finds

- mass rule: the lowest threshold ``t`` with ``sum(p[bits > t]) < mass``; every value above ``t`` is
  in the kept prefix, and of the values equal to ``t`` (a tie group) the first ``ceil((mass - that
  sum) / value)`` are. That count, capped at ``keep``, is the number of blocks to keep (top-k: ``keep``);
- the value of the count-th largest probability; the blocks above it are kept, and of those equal to it
  the lowest-indexed ones up to the count.

So a row keeps exactly as many blocks as ``select_blocks``, and the same ones when the probabilities
have no ties. Where they tie at the boundary, ``torch.topk`` picks an unspecified subset; this kernel
picks the lowest key-block indices. Sums are fp32 reductions in another order than ``cumsum``: a
row whose mass boundary is within rounding of ``mass`` may keep one block more or less.

Lists without sorting: with ``before`` = kept blocks left of column ``j``, a kept block goes to
position ``before`` and a dropped one to ``count + (j - before)`` (it holds 0), a permutation of
[0, M): one scattered store writes the whole row, as ``listed_blocks`` would.

Cost (Wan2.1-14B 720p: N = 75,600, M = 591 -> M_PAD = 1024, 40 heads, CFG batch 2 -> 80 plans, 2,960
programs of 16 query blocks): the scores are 80 x 591 x 1024 x 128 = 6.2 G fp32 FMA (padding included),
the bisections 30 (top-k) or 60 (mass) steps of a compare and a row sum over 47k rows x 1024 values
(~6-12 G simple ops), ~0.9 GB of pooled-key reads from L2 and 140 MB of writes (the int32 index lists
and the full flags, as any plan of this format): ~0.3-0.5 ms on an H200, plus the block means (reading
q and k once, 3.1 GB: ~0.7 ms). Dense attention there is 4 x 80 x 75,600^2 x 128 = 234 TFLOP, ~0.35 s:
prediction ~0.3% of it. Estimates, not measurements (``benchmarks/attention.py`` records ``predict_share``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Key blocks per row (N <= 262k tokens at 128-token blocks): tl.dot stages the [16, M_PAD] fp32 key slice in
# shared memory, 128 KB at 2048 (Hopper and A100 have 227 / 163 KB); ops.v2 takes the PyTorch path beyond.
MAX_BLOCKS = 2048
_TILE_VALUES = 16384  # BLOCK_Q * M_PAD: the probabilities a program holds (up to M_PAD = 1024 at 16 rows)
_ONE_BITS = 0x3F800000  # float32 1.0 as int32: probabilities' bit patterns lie in [0, _ONE_BITS]
_BISECT_STEPS = 30  # 2**30 > _ONE_BITS + 1


@triton.jit
def _block_select_kernel(
    PooledQ, PooledK, Always, Dense, NumBlocks, Indices, Full,
    stride_qp, stride_qm, stride_qd,
    stride_kp, stride_km, stride_kd,
    M, keep, mass, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, M_PAD: tl.constexpr,
    MASS: tl.constexpr, HAS_DENSE: tl.constexpr, ONE_BITS: tl.constexpr, STEPS: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    plan = tl.program_id(1).to(tl.int64)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, M_PAD)
    live_row = rows < M
    live_col = cols < M
    live = live_row[:, None] & live_col[None, :]

    # -- scores: pooled queries x pooled keys, fp32, over head-dim slices --
    q_base = PooledQ + plan * stride_qp + rows[:, None].to(tl.int64) * stride_qm
    k_base = PooledK + plan * stride_kp + cols[None, :].to(tl.int64) * stride_km
    acc = tl.zeros([BLOCK_Q, M_PAD], tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
        dq = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_base + dq[None, :] * stride_qd, mask=live_row[:, None] & (dq[None, :] < HEAD_DIM), other=0.0)
        k = tl.load(k_base + dq[:, None] * stride_kd, mask=(dq[:, None] < HEAD_DIM) & live_col[None, :], other=0.0)
        acc = tl.dot(q, k, acc, input_precision="ieee")

    # -- softmax over key blocks (qk_scale includes log2(e): exp2) --
    s = tl.where(live_col[None, :], acc * qk_scale, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    bits = tl.where(live_col[None, :], p.to(tl.int32, bitcast=True), -1)  # padding never counts

    # -- how many blocks to keep --
    count = tl.full([BLOCK_Q], 0, tl.int32) + keep
    if MASS:
        # Lowest t with sum(p[bits > t]) < mass (true at ONE_BITS; lo = -1 is never tested).
        lo = tl.full([BLOCK_Q], -1, tl.int32)
        hi = tl.full([BLOCK_Q], ONE_BITS, tl.int32)
        for _ in range(STEPS):
            mid = lo + (hi - lo) // 2
            above = tl.sum(tl.where(bits > mid[:, None], p, 0.0), 1)
            covered = above < mass
            hi = tl.where(covered, mid, hi)
            lo = tl.where(covered, lo, mid)
        above = tl.sum(tl.where(bits > hi[:, None], p, 0.0), 1)
        n_above = tl.sum((bits > hi[:, None]).to(tl.int32), 1)
        n_tied = tl.sum((bits == hi[:, None]).to(tl.int32), 1)
        value = hi.to(tl.float32, bitcast=True)
        # The j-th of the tie group (j from 0) is kept while above + j * value < mass.
        n_fit = tl.where(value > 0, tl.ceil((mass - above) / tl.maximum(value, 1e-38)), float("inf"))
        n_tie_kept = tl.minimum(n_fit, n_tied.to(tl.float32)).to(tl.int32)  # clamped before the cast
        count = tl.minimum(count, n_above + n_tie_kept)
        count = tl.maximum(count, 1)

    # -- the count-th largest value: largest t with #(bits >= t) >= count --
    lo = tl.full([BLOCK_Q], 0, tl.int32)
    hi = tl.full([BLOCK_Q], ONE_BITS + 1, tl.int32)
    for _ in range(STEPS):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((bits >= mid[:, None]).to(tl.int32), 1) >= count
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = bits > lo[:, None]
    tied = bits == lo[:, None]
    need = count - tl.sum(above.to(tl.int32), 1)
    tie_rank = tl.cumsum(tied.to(tl.int32), 1) - 1  # lowest key-block index first among ties
    chosen = above | (tied & (tie_rank < need[:, None]))

    # -- forced blocks and the dense flag --
    always_ptrs = Always + rows[:, None].to(tl.int64) * M + cols[None, :]
    chosen = chosen | (tl.load(always_ptrs, mask=live, other=0) != 0)
    if HAS_DENSE:
        chosen = chosen | (tl.load(Dense) != 0)
    chosen = chosen & live_col[None, :]

    # -- lists: kept blocks ascending, then zeros; one scattered store of a permutation of [0, M) --
    kept = chosen.to(tl.int32)
    before = tl.cumsum(kept, 1) - kept
    total = tl.sum(kept, 1)
    position = tl.where(chosen, before, total[:, None] + cols[None, :] - before)
    out_row = (plan * M + rows[:, None].to(tl.int64)) * M
    tl.store(Indices + out_row + position, tl.where(chosen, cols[None, :], 0), mask=live)
    tl.store(Full + out_row + cols[None, :], (cols[None, :] < total[:, None]).to(tl.uint8), mask=live)
    tl.store(NumBlocks + plan * M + rows, total, mask=live_row)


def block_select(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    always: torch.Tensor,
    scale: float,
    keep: int,
    mass: float | None = None,
    dense: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key blocks per query block from pooled scores, as ``ops.v2.select_blocks`` + ``plan.listed_blocks``.

    Parameters
    ----------
    pooled_q, pooled_k: float32 [P, M, D]
        Block means of queries and keys, one plan per (batch element, head); any strides.
    always: bool [M, M]
        Blocks every plan keeps (text and sink rows and columns, the diagonal); contiguous.
    scale:
        Softmax scale of the pooled scores.
    keep:
        Most key blocks selected per query block (``ceil(M * (1 - sparsity))``, at least 1).
    mass:
        ``None``: keep exactly ``keep`` blocks (top-k). Else keep the smallest prefix of the top blocks,
        by descending probability, whose preceding mass reaches ``mass`` (at most ``keep``).
    dense:
        Optional bool scalar on the device: when True every block is kept (dense warm-up). Never read
        on the host.
    num_warps:
        Override of the launch's warps (default: 32 tile values per thread, 4 to 16 warps).

    Returns
    -------
    kv_num_blocks: int32 [P, M]
    kv_indices: int32 [P, M, M], ascending, padded with 0
    block_full: bool [P, M, M], True at the listed positions
    """
    assert pooled_q.dim() == 3 and pooled_k.shape == pooled_q.shape, (
        f"pooled_q and pooled_k must be [P, M, D] of one shape, got {tuple(pooled_q.shape)}, {tuple(pooled_k.shape)}"
    )
    assert pooled_q.dtype == torch.float32 and pooled_k.dtype == torch.float32, "pooled means must be float32"
    P, M, D = pooled_q.shape
    assert always.shape == (M, M) and always.dtype == torch.bool and always.is_contiguous(), (
        f"always must be a contiguous bool [{M}, {M}], got {always.dtype} {tuple(always.shape)}"
    )
    assert 1 <= keep <= M, f"keep must be in [1, {M}], got {keep}"
    assert M <= MAX_BLOCKS, f"{M} key blocks: the kernel holds at most {MAX_BLOCKS} per row"
    assert dense is None or dense.numel() == 1, "dense must be a bool scalar"
    m_pad = max(16, triton.next_power_of_2(M))
    block_q = max(16, min(64, _TILE_VALUES // m_pad, triton.next_power_of_2(M)))
    if num_warps is None:  # not measured yet: 32 fp32 values of the [BLOCK_Q, M_PAD] tile per thread
        num_warps = min(16, max(4, block_q * m_pad // 1024))
    device = pooled_q.device
    kv_num_blocks = torch.empty(P, M, dtype=torch.int32, device=device)
    kv_indices = torch.empty(P, M, M, dtype=torch.int32, device=device)
    block_full = torch.empty(P, M, M, dtype=torch.bool, device=device)
    always_u8 = always.view(torch.uint8)
    dense_u8 = always_u8 if dense is None else dense.reshape(()).to(torch.bool).view(torch.uint8)
    _block_select_kernel[(triton.cdiv(M, block_q), P)](
        pooled_q, pooled_k, always_u8, dense_u8, kv_num_blocks, kv_indices, block_full.view(torch.uint8),
        *pooled_q.stride(), *pooled_k.stride(),
        M, keep, 0.0 if mass is None else float(mass), scale * 1.44269504,  # log2(e): the kernel uses exp2
        HEAD_DIM=D, BLOCK_D=16, BLOCK_Q=block_q, M_PAD=m_pad,
        MASS=mass is not None, HAS_DENSE=dense is not None, ONE_BITS=_ONE_BITS, STEPS=_BISECT_STEPS,
        num_warps=num_warps,
    )  # fmt: skip
    return kv_num_blocks, kv_indices, block_full
