"""Triton kernel of RainFusion 2.0's block selection: pooled scores -> softmax -> top-k / mass -> block lists.

One pass from the block means to the plan: per (plan, tile of query blocks) it scores the pooled
queries against every pooled key block, takes the softmax over key blocks, selects key blocks
(``select_blocks`` of ``ops.v2``: top-k count, or the cumulative-mass prefix of the top-k), takes the
forced blocks (text / sink rows and columns, the diagonal) first and inside the budget, ORs in the dense
warm-up flag, and writes
``kv_num_blocks``, ``kv_indices`` (ascending, padded with 0) and ``block_full`` directly. No
[plans, M, M] float tensor is written; the PyTorch path writes three (scores, scaled scores, softmax),
bool and int8 masks of that size, and sorts every row (int64 indices).

Design
------
Grid ``(cdiv(M, BLOCK_Q), plans)``, ``BLOCK_Q`` = 16 query blocks at M_PAD = 512-1024 (M_PAD: M padded
to a power of two, at least 32; ``launch_shape``). A program holds the fp32 probabilities of its rows
against all key blocks as a 3-D tile: rows on dim 1, key block ``chunk * 32 + lane`` over the other two
dims. Triton lays it out with the lanes over a warp's lanes and the rows over warps (which dim holds
the lanes depends on the Triton version: ``_lane_dim``), so one warp owns one (or two) rows, each
thread C = M_PAD / 32 values of it (32 at M = 591), every row reduction of the selection stays inside
a warp (no shared memory, no barrier) and a per-row value is one register. Never an [M, D] tile: the
scores are fp32 outer products over the head dim, one pooled-query value per row and one pooled-key
row per step, the keys read along M (coalesced: v2 writes the key means as [D, M] memory) and shared
by the warps through L1; the key load is shaped like the tile so that it sets the tile's layout (a
load of one row's shape put warps over key blocks, and every reduction went through shared memory).
fp32 FMAs, not TF32, as the PyTorch path's fp32 matmul (TF32 changes selections near ties);
``tl.dot``'s FMA path was tried first and spilled ([16, M_PAD] operand slices per thread). Resources
for sm_90 at Triton 3.6 and 3.7: ``benchmarks/results/cpu/block_select_resources_triton3.*.md``.
Several rows per program share each pooled-key read (M x D x 4 bytes from L2): 16 rows cut that
traffic to 0.9 GB at the size below.

Selection is exact on the probabilities without sorting. The bits of a non-negative float32 order
like its value, so a bisection over int32 bit patterns (30 steps cover [0, bits(1.0)]) finds

Forced blocks are taken first: their count comes off ``keep`` and their probability off ``mass``, and
they leave the bisections below (p = 0 there).

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
programs of 16 warps): the scores are 80 x 591 x 1024 x 128 = 6.2 G fp32 FMA (padding included) with a
pooled-key load from L1 per FMA, ~0.5-0.8 ms if L1-bound; the bisections 30 (top-k) or 60 (mass) steps
of a compare and an in-warp row sum over 47k rows x 1024 values (~6-12 G simple ops, ~0.2-0.4 ms); 140
MB of writes (the int32 lists and full flags, as any plan in this format). Plus the block means, which
read q and k once (3.1 GB, ~0.7 ms). Dense attention there is 4 x 80 x 75,600^2 x 128 = 234 TFLOP,
~0.35 s: prediction ~0.5% of it. Estimates, not measurements (``benchmarks/attention.py`` records
``predict_share``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Key blocks per row (N <= 262k tokens at 128-token blocks): a thread holds M_PAD / 32 probabilities of its
# row, 64 at 2048 (255 registers, no spills); ops.v2 takes the PyTorch path beyond.
MAX_BLOCKS = 2048
_LANES = 32  # key block chunk * _LANES + lane: the lane dim of the tile goes over a warp's lanes
_ONE_BITS = 0x3F800000  # float32 1.0 as int32: probabilities' bit patterns lie in [0, _ONE_BITS]
_BISECT_STEPS = 30  # 2**30 > _ONE_BITS + 1


@triton.jit
def _on(x, DIM: tl.constexpr):
    """A 1-D tensor as a 3-D one along ``DIM``."""
    if DIM == 0:
        y = x[:, None, None]
    elif DIM == 1:
        y = x[None, :, None]
    else:
        y = x[None, None, :]
    return y


@triton.jit
def _row_sum(x, LANE_DIM: tl.constexpr, CHUNK_DIM: tl.constexpr):
    """Sum over the key blocks of a tile -> [1, BLOCK_Q, 1] (in-thread over chunks, in-warp over lanes)."""
    return tl.sum(tl.sum(x, axis=LANE_DIM, keep_dims=True), axis=CHUNK_DIM, keep_dims=True)


@triton.jit
def _row_cumsum(x, LANE_DIM: tl.constexpr, CHUNK_DIM: tl.constexpr):
    """Inclusive prefix sum of a tile over the key blocks (block ``chunk * LANES + lane``)."""
    chunk = tl.sum(x, axis=LANE_DIM, keep_dims=True)
    return tl.cumsum(x, axis=LANE_DIM) + tl.cumsum(chunk, axis=CHUNK_DIM) - chunk


# Sizes and strides not specialised on divisibility by 16: with that hint (M = 256, say) Triton 3.6
# lowers the row scans for sm_90 with a layout its ScanOpToLLVM asserts on (crashed on the H200).
@triton.jit(do_not_specialize=["M", "keep", "stride_qp", "stride_qm", "stride_kp", "stride_kd"])
def _block_select_kernel(
    PooledQ, PooledK, Always, Dense, Keep, NumBlocks, Indices, Full,
    stride_qp, stride_qm, stride_qd,
    stride_kp, stride_km, stride_kd,
    M, keep, mass, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, M_PAD: tl.constexpr, LANES: tl.constexpr,
    LANE_DIM: tl.constexpr, CHUNK_DIM: tl.constexpr,
    MASS: tl.constexpr, HAS_DENSE: tl.constexpr, PER_PLAN_KEEP: tl.constexpr, ONE_BITS: tl.constexpr,
    STEPS: tl.constexpr,
):  # fmt: skip
    # A tile is 3-D: query-block rows on dim 1, key block ``chunk * LANES + lane`` on the other two (see
    # ``_lane_dim``), laid out with lanes over a warp and rows over warps: a row lives in one warp
    # (in-warp reductions, one register per row value) and each thread holds M_PAD / LANES of its blocks.
    C: tl.constexpr = M_PAD // LANES
    row0 = tl.program_id(0) * BLOCK_Q
    plan = tl.program_id(1).to(tl.int64)
    local = tl.arange(0, BLOCK_Q)[None, :, None]  # in-tile offsets stay int32, bases are int64 scalars
    cols = _on(tl.arange(0, C), CHUNK_DIM) * LANES + _on(tl.arange(0, LANES), LANE_DIM)
    live_row = row0 + local < M
    live_col = cols < M
    live = live_row & live_col

    # -- scores: fp32 outer products over the head dim, one pooled-key row per step (coalesced along M
    # when the keys are [D, M] in memory); tl.dot's FMA path held [16, M_PAD] operand slices and spilled --
    q_ptrs = PooledQ + plan * stride_qp + row0.to(tl.int64) * stride_qm + local * stride_qm
    k_ptrs = PooledK + plan * stride_kp + cols * stride_km
    acc = tl.zeros(live.shape, tl.float32)
    for d in range(HEAD_DIM):
        q = tl.load(q_ptrs + d * stride_qd, mask=live_row, other=0.0)
        k = tl.load(k_ptrs + d * stride_kd, mask=live, other=0.0)  # tile-shaped: the load sets the tile's layout
        acc += q * k

    # -- softmax over key blocks (qk_scale includes log2(e): exp2) --
    s = tl.where(live_col, acc * qk_scale, float("-inf"))
    p = tl.exp2(s - tl.max(tl.max(s, axis=LANE_DIM, keep_dims=True), axis=CHUNK_DIM, keep_dims=True))
    p = p / _row_sum(p, LANE_DIM, CHUNK_DIM)
    # -- forced blocks (text / sink rows and columns, the diagonal) are taken first, inside the budget:
    # the rest of the row competes for what they leave of ``keep`` (and of ``mass``) --
    tile = local * M + cols  # int32 offsets inside the tile's rows
    forced = (tl.load(Always + row0.to(tl.int64) * M + tile, mask=live, other=0) != 0) & live_col
    n_forced = _row_sum(forced.to(tl.int32), LANE_DIM, CHUNK_DIM)
    mass_left = mass - _row_sum(tl.where(forced, p, 0.0), LANE_DIM, CHUNK_DIM)
    p = tl.where(forced, 0.0, p)
    bits = p.to(tl.int32, bitcast=True)  # padding columns: p = 0, never counted (live_col below)

    # -- how many more blocks to keep (at least one in a row with nothing forced) --
    floor = (n_forced == 0).to(tl.int32)
    if PER_PLAN_KEEP:  # a calibration profile's budget per (batch element, head)
        keep = tl.load(Keep + plan)
    count = tl.maximum(keep - n_forced, floor)
    if MASS:
        # Lowest t with sum(p[bits > t]) < mass (true at ONE_BITS; lo = -1 is never tested).
        lo = tl.full([1, BLOCK_Q, 1], -1, tl.int32)
        hi = tl.full([1, BLOCK_Q, 1], ONE_BITS, tl.int32)
        for _ in range(STEPS):
            mid = lo + (hi - lo) // 2
            covered = _row_sum(tl.where(bits > mid, p, 0.0), LANE_DIM, CHUNK_DIM) < mass_left  # padding adds 0
            hi = tl.where(covered, mid, hi)
            lo = tl.where(covered, lo, mid)
        above = _row_sum(tl.where(bits > hi, p, 0.0), LANE_DIM, CHUNK_DIM)
        n_above = _row_sum(((bits > hi) & live_col).to(tl.int32), LANE_DIM, CHUNK_DIM)
        n_tied = _row_sum(((bits == hi) & live_col & ~forced).to(tl.int32), LANE_DIM, CHUNK_DIM)
        value = hi.to(tl.float32, bitcast=True)
        # The j-th of the tie group (j from 0) is kept while above + j * value < mass.
        n_fit = tl.where(value > 0, tl.ceil((mass_left - above) / tl.maximum(value, 1e-38)), float("inf"))
        n_tie_kept = tl.minimum(tl.maximum(n_fit, 0.0), n_tied.to(tl.float32)).to(tl.int32)  # clamped before the cast
        count = tl.maximum(tl.minimum(count, n_above + n_tie_kept), floor)

    # -- the count-th largest value: largest t with #(bits >= t) >= count --
    lo = tl.full([1, BLOCK_Q, 1], 0, tl.int32)
    hi = tl.full([1, BLOCK_Q, 1], ONE_BITS + 1, tl.int32)
    for _ in range(STEPS):
        mid = lo + (hi - lo) // 2
        enough = _row_sum(((bits >= mid) & live_col & ~forced).to(tl.int32), LANE_DIM, CHUNK_DIM) >= count
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = (bits > lo) & live_col
    tied = (bits == lo) & live_col & ~forced
    need = count - _row_sum(above.to(tl.int32), LANE_DIM, CHUNK_DIM)
    tie_rank = _row_cumsum(tied.to(tl.int32), LANE_DIM, CHUNK_DIM) - 1  # lowest key-block index first among ties
    chosen = above | (tied & (tie_rank < need))

    # -- forced blocks and the dense flag --
    chosen = chosen | forced
    if HAS_DENSE:
        chosen = chosen | (tl.load(Dense) != 0)
    chosen = chosen & live_col

    # -- lists: kept blocks ascending, then zeros; one scattered store of a permutation of [0, M) --
    kept = chosen.to(tl.int32)
    before = _row_cumsum(kept, LANE_DIM, CHUNK_DIM) - kept
    total = _row_sum(kept, LANE_DIM, CHUNK_DIM)
    position = tl.where(chosen, before, total + cols - before)
    base = (plan * M + row0) * M
    tl.store(Indices + base + local * M + position, tl.where(chosen, cols, 0), mask=live)
    tl.store(Full + base + tile, (cols < total).to(tl.uint8), mask=live)
    tl.store(NumBlocks + plan * M + row0 + local, total, mask=live_row)


def _lane_dim() -> int:
    """The tile dim of the lanes (the other non-row dim holds a thread's chunks), per Triton version.

    The tile's layout comes from its loads, whose dim order Triton sorts by the pointers' contiguity:
    lanes (contiguous key blocks) first, then the rows and chunk dims, which tie. Triton 3.7 breaks the
    tie from the last dim down, 3.6 and older from dim 0 up, and the first dim after the lanes gets the
    warps: rows must win, so the lanes go last on 3.7 and first before it. Either works; the other puts
    warps over key blocks (cross-warp reductions, 16 copies of each row value, spills).
    """
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return 2 if (major, minor) >= (3, 7) else 0


def launch_shape(M: int) -> tuple[int, int, int]:
    """(M_PAD, BLOCK_Q, num_warps) for rows of ``M`` key blocks.

    A warp holds one query-block row (two when M_PAD <= 256) at up to 32 values per thread, 64 at M_PAD = 2048
    (8 warps of up to 255 registers): no spills for sm_90 (``benchmarks/kernel_resources.py --kernel block_select``).
    """
    m_pad = max(_LANES, triton.next_power_of_2(M))
    per_thread = m_pad // _LANES  # key blocks of one row a thread holds
    warps, rows_per_warp = (8, 1) if per_thread >= 64 else (16, 1 if per_thread >= 16 else 2)
    block_q = min(warps * rows_per_warp, triton.next_power_of_2(M))
    return m_pad, block_q, min(warps, block_q)


def block_select(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    always: torch.Tensor,
    scale: float,
    keep: int | torch.Tensor,
    mass: float | None = None,
    dense: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key blocks per query block from pooled scores, as ``ops.v2.select_blocks`` + ``plan.listed_blocks``.

    Parameters
    ----------
    pooled_q, pooled_k: float32 [P, M, D]
        Block means of queries and keys, one plan per (batch element, head); any strides. Key means in
        [P, D, M] memory (M fastest) are read coalesced.
    always: bool [M, M]
        Blocks every plan keeps (text and sink rows and columns, the diagonal), taken first and counted
        inside ``keep`` (a row with more of them keeps all and nothing else); contiguous.
    scale:
        Softmax scale of the pooled scores.
    keep:
        Most key blocks kept per query block, forced ones included (``ceil(M * (1 - sparsity))``, at least 1);
        or an int32 [P] tensor of such budgets, one per plan (a calibration profile's per-head densities).
    mass:
        ``None``: keep exactly ``keep`` blocks (top-k). Else keep the smallest prefix of the top blocks,
        by descending probability, whose preceding mass reaches ``mass`` (at most ``keep``).
    dense:
        Optional bool scalar on the device: when True every block is kept (dense warm-up). Never read
        on the host.
    num_warps:
        Override of the launch's warps (default: ``launch_shape``).

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
    per_plan = isinstance(keep, torch.Tensor)
    if per_plan:
        assert keep.shape == (P,) and keep.dtype == torch.int32, (
            f"keep must be an int32 [{P}], got {keep.dtype} {tuple(keep.shape)}"
        )
    else:
        assert 1 <= keep <= M, f"keep must be in [1, {M}], got {keep}"
    assert M <= MAX_BLOCKS, f"{M} key blocks: the kernel holds at most {MAX_BLOCKS} per row"
    assert dense is None or dense.numel() == 1, "dense must be a bool scalar"
    m_pad, block_q, warps = launch_shape(M)
    lane_dim = _lane_dim()
    device = pooled_q.device
    kv_num_blocks = torch.empty(P, M, dtype=torch.int32, device=device)
    kv_indices = torch.empty(P, M, M, dtype=torch.int32, device=device)
    block_full = torch.empty(P, M, M, dtype=torch.bool, device=device)
    always_u8 = always.view(torch.uint8)
    dense_u8 = always_u8 if dense is None else dense.reshape(()).to(torch.bool).view(torch.uint8)
    _block_select_kernel[(triton.cdiv(M, block_q), P)](
        pooled_q, pooled_k, always_u8, dense_u8, keep if per_plan else kv_num_blocks, kv_num_blocks, kv_indices,
        block_full.view(torch.uint8), *pooled_q.stride(), *pooled_k.stride(),
        M, 0 if per_plan else keep, 0.0 if mass is None else float(mass), scale * 1.44269504,  # log2(e): exp2
        HEAD_DIM=D, BLOCK_Q=block_q, M_PAD=m_pad, LANES=_LANES, LANE_DIM=lane_dim, CHUNK_DIM=2 - lane_dim,
        MASS=mass is not None, HAS_DENSE=dense is not None, PER_PLAN_KEEP=per_plan, ONE_BITS=_ONE_BITS,
        STEPS=_BISECT_STEPS,
        num_warps=warps if num_warps is None else num_warps,
    )  # fmt: skip
    return kv_num_blocks, kv_indices, block_full
