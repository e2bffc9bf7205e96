"""The block-sparse attention kernel: one program per (query block, batch x head) walks its plan
row's key blocks with an online softmax (``attend_blocks``), in the passes of ``LOOP``.

Semantics and the loads/loops options: ``block_sparse``'s docstring. Not here: where it runs and its
launch configurations (``sparse_config``), tile copies (``sparse_tiles``), the launcher (``block_sparse``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from rf_compile.kernels.sparse_config import CONFIGS, prune_configs
from rf_compile.kernels.sparse_tiles import load_kv, out_tile, source_index, tile_load, tile_store

__all__ = ["attend_blocks", "block_sparse_fwd_kernel", "work_item"]


@triton.jit
def work_item(QBlockOrder, NumHeavy, num_q_blocks):
    """(query block, batch x head) of this program: the launch order, query blocks fastest, with the
    ``NumHeavy`` query blocks that see every key block (``plan_extras``: text rows) of every head taken first.

    The blocks start roughly in launch order, so a long row launched last ends the kernel alone (the
    last head's text rows: 139 key blocks where the others walk ~28); run first, they overlap the rest.
    ``QBlockOrder`` lists the query blocks, those heavy ones first; the rest keep their order, so that
    programs running together still share their head's key blocks in L2.
    """
    heads = tl.num_programs(1)
    item = tl.program_id(1) * num_q_blocks + tl.program_id(0)
    heavy = tl.load(NumHeavy)
    first = item < heavy * heads  # heads fastest: every head's heavy rows in the first wave
    rest = item - heavy * heads
    light = tl.maximum(num_q_blocks - heavy, 1)
    # Selects, not an ``if``: a head index that an scf.if yields turns warp specialisation off (the descriptors
    # are made from it; Triton 3.6, NOTES.md entry 4), which benchmarks/kernel_resources.py checks.
    bh = tl.where(first, item % heads, rest // light)
    rank = tl.where(first, item // heads, heavy + rest % light)
    return tl.load(QBlockOrder + rank), bh


@triton.jit
def attend_blocks(
    acc, l_i, m_i, q,
    K_desc, V_desc, K_head, V_head, Orders, kv_order, Bias_row, idx_row,
    lo, hi, q_pos, N, prefix, video_end, band, kv_valid, qk_scale, stride_km, stride_vm, KScale_row,
    k_src, v_src, b, h,
    HEAD_DIM: tl.constexpr, SUB_N: tl.constexpr, SPLIT_N: tl.constexpr,
    MASKED: tl.constexpr, USE_TMA: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FP8: tl.constexpr, QK_INT8: tl.constexpr,
    HOST_DESC: tl.constexpr,
):
    """Online softmax over the plan's key blocks ``idx_row[lo:hi]``, each walked in SPLIT_N sub-tiles.

    ``MASKED`` applies the element mask (partial blocks, the ragged last block); without it the
    blocks are taken whole. ``qk_scale`` is in log2 units. ``FP8``: q, k, v are 8-bit copies; P
    enters its product as e4m3 times 448 (the caller divides it out with V's scale). Q K^T is e4m3
    with each key block's scale (``KScale_row``) rescaling its scores, or (``QK_INT8``) int8 with
    int32 sums and K's per-head scale folded into ``qk_scale`` by the caller, as Q's always is.
    ``k_src``, ``v_src``, ``b``, ``h``: the head in host-made descriptors (``HOST_DESC``, ``sparse_tiles``).
    """
    # Counted from 0, the form of Triton's own specialised kernels.
    if MASKED:
        # -- element mask as a key interval per row (5 operations a score instead of 8): text rows see every
        # key, video rows the existing keys within the band (all of them without one), and text keys --
        text_q = (q_pos < prefix) | (q_pos >= video_end)
        video_lo = tl.where(band < 0, 0, q_pos - band)
        video_hi = tl.where(band < 0, kv_valid - 1, tl.minimum(q_pos + band, kv_valid - 1))
        row_lo = tl.where(text_q, 0, video_lo)
        row_hi = tl.where(text_q, N - 1, video_hi)
    for t in tl.range(0, hi - lo, warp_specialize=WARP_SPECIALIZE):
        kb = tl.load(idx_row + lo + t)
        if FP8 and not QK_INT8:
            block_scale = qk_scale * tl.load(KScale_row + kb)
        else:
            block_scale = qk_scale
        for s in tl.static_range(SPLIT_N):
            k, v, k_pos, bias = load_kv(K_desc, V_desc, K_head, V_head, Orders, kv_order, Bias_row,
                                         kb * SPLIT_N + s, N, stride_km, stride_vm, k_src, v_src, b, h,
                                         HEAD_DIM, SUB_N, USE_TMA, HAS_BIAS, EVEN_N, FP8, HOST_DESC)
            # -- scores (base 2) --
            if QK_INT8:
                qk = tl.dot(q, tl.trans(k)).to(tl.float32)  # exact int32 sums
            elif UPCAST:  # the interpreter computes bf16 dots wrongly (bf16 held as uint16 in numpy)
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                qk = tl.dot(q, tl.trans(k))
            if HAS_BIAS:
                qk = qk * block_scale + bias[None, :]
            if MASKED:
                text_k = ((k_pos < prefix) | (k_pos >= video_end)) & (k_pos < kv_valid)
                inside = (k_pos[None, :] >= row_lo[:, None]) & (k_pos[None, :] <= row_hi[:, None])
                qk = tl.where(inside | text_k[None, :], qk, float("-inf"))
            # -- online softmax --
            if HAS_BIAS:
                m_new = tl.maximum(m_i, tl.max(qk, 1))
            else:  # scale folded into one FMA per score (qk_scale > 0, checked by the launcher)
                m_new = tl.maximum(m_i, tl.max(qk, 1) * block_scale)
            if MASKED or HAS_BIAS:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at 0
            else:
                m_use = m_new
            if HAS_BIAS:
                p = tl.math.exp2(qk - m_use[:, None])
            else:
                p = tl.math.exp2(qk * block_scale - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if FP8:
                acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc)
            elif UPCAST:
                acc = tl.dot(p, v.to(tl.float32), acc)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=CONFIGS,
                 key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "N_BUCKET", "USE_TMA", "LOOP", "HAS_BIAS", "FP8", "QK_INT8",
                      "HOST_DESCRIPTORS"],
                 prune_configs_by={"early_config_prune": prune_configs},
                 restore_value=["Out", "OP"])  # the fix-up pass (LOOP 3) adds to the tiles it reads
@triton.jit
def block_sparse_fwd_kernel(
    Q, K, V, QP, KP, VP, Out, OP, Bias, Lse, QScale, KScale, VScale,
    Orders, QOrder, KVOrder, Band, KVValid,
    KVNum, KVNumMasked, KVIdx, VariantOfHead, QBlockOrder, NumHeavy,
    QDesc, KDesc, VDesc, ODesc, LseDesc, QSrc, KSrc, VSrc, OSrc,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_km,
    stride_vb, stride_vh, stride_vm,
    stride_ob, stride_oh, stride_om,
    stride_biasb,
    H, N, prefix, video_end, num_q_blocks, max_kv_blocks, qk_scale, n_pad,
    N_BUCKET: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, LOOP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, SPLIT_N: tl.constexpr, FP8: tl.constexpr,
    QK_INT8: tl.constexpr, HOST_DESCRIPTORS: tl.constexpr,
):
    """One (query block, batch x head) program (``work_item``). ``LOOP`` (see ``_LOOPS``): 0 masked then unmasked
    blocks, 1 every block masked, 2 the unmasked blocks alone (stores the tile and its base-2
    log-sum-exp in ``Lse``), 3 the masked blocks added to what pass 2 left (programs without
    masked blocks return at once). ``FP8``: Q/K/V are ``fp8_quant``'s 8-bit copies (every head
    reads them in its order; V transposed, [D, n_pad] per head) with their scales; ``QK_INT8``: Q and
    K in int8, K with one scale per head. ``HOST_DESCRIPTORS``: the tiles move through the host-made descriptors
    ``QDesc`` .. ``LseDesc`` (``sparse_tiles``), each head reading the tensor its ``*Src`` pair code and order
    pick; otherwise, and in a warp-specialised launch, each program makes its own."""
    tl.static_assert(BLOCK_N % (16 * SPLIT_N) == 0 and BLOCK_M % 16 == 0, "block sizes must be multiples of 16")
    SUB_N: tl.constexpr = BLOCK_N // SPLIT_N  # key tile: a plan block is walked in SPLIT_N sub-tiles
    # Not in a warp-specialised launch: Triton 3.6's specialisation pass crashes on the 5-D tiles' reshapes
    # (WSDataPartition: "unsupported op type"; benchmarks/kernel_resources.py --descriptors host).
    HOST_DESC: tl.constexpr = HOST_DESCRIPTORS and not WARP_SPECIALIZE
    m, bh = work_item(QBlockOrder, NumHeavy, num_q_blocks)
    b = bh // H
    h = bh % H

    # -- this head's variant: orders, band, plan row --
    p = tl.load(VariantOfHead + bh)
    q_order = tl.load(QOrder + p).to(tl.int64)
    kv_order = tl.load(KVOrder + p).to(tl.int64)
    band = tl.load(Band + p)
    kv_valid = tl.load(KVValid + p)
    plan_row = (p * num_q_blocks + m).to(tl.int64)
    num_blocks = tl.load(KVNum + plan_row)
    num_masked = tl.load(KVNumMasked + plan_row)
    if LOOP == 3:
        if num_masked == 0:  # nothing to add: pass 2's tile is final
            return
    idx_row = KVIdx + plan_row * max_kv_blocks

    d = tl.arange(0, HEAD_DIM)
    q_pos = m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_rows = tl.load(Orders + q_order * N + q_pos, mask=q_pos < N, other=0).to(tl.int64)
    q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_head = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_head = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    bias_row = Bias + b.to(tl.int64) * stride_biasb

    # -- Q tile --
    q_src = source_index(QSrc, q_order)
    k_src = source_index(KSrc, kv_order)
    v_src = source_index(VSrc, kv_order)
    if HOST_DESC:
        k_desc = KDesc
        v_desc = VDesc
        q = tile_load(QDesc, q_src, b, h, m * BLOCK_M, 0, BLOCK_M, HEAD_DIM, True)
    elif USE_TMA:
        # Permuted heads read the scratch copies (same strides as Q/K/V), identity heads in place. A
        # select, not an ``if``: a descriptor made from a pointer that an scf.if yields silently turns
        # warp specialisation off (Triton 3.6; NOTES.md entry 4).
        q_head = tl.where(q_order != 0, QP + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, q_head)
        k_head = tl.where(kv_order != 0, KP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, k_head)
        v_head = tl.where(kv_order != 0, VP + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, v_head)
        q_desc = tl.make_tensor_descriptor(q_head, shape=[N, HEAD_DIM], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_head, shape=[N, HEAD_DIM], strides=[stride_km, 1],
                                           block_shape=[SUB_N, HEAD_DIM])
        if FP8:
            v_desc = tl.make_tensor_descriptor(v_head, shape=[HEAD_DIM, n_pad], strides=[stride_vm, 1],
                                               block_shape=[HEAD_DIM, SUB_N])
        else:
            v_desc = tl.make_tensor_descriptor(v_head, shape=[N, HEAD_DIM], strides=[stride_vm, 1],
                                               block_shape=[SUB_N, HEAD_DIM])
        q = q_desc.load([m * BLOCK_M, 0])
    else:
        k_desc = k_head  # unused placeholders
        v_desc = v_head
        q = tl.load(q_head + q_rows[:, None] * stride_qm + d[None, :], mask=(q_pos < N)[:, None], other=0.0)

    qk_scale = qk_scale * 1.44269504  # log2(e)
    k_scale_row = KScale + bh.to(tl.int64) * (n_pad // BLOCK_N)
    if FP8:
        qk_scale = qk_scale * tl.load(QScale + bh.to(tl.int64) * (n_pad // BLOCK_M) + m)
        if QK_INT8:  # K's scale is the head's: a loop invariant, like Q's
            qk_scale = qk_scale * tl.load(KScale + bh)

    if LOOP == 3:
        # -- resume from pass 2: its normalised tile and log-sum-exp are the state (acc, l=1, m=lse) --
        o_head, o_desc = out_tile(Out, OP, ODesc, b, h, q_order, stride_ob, stride_oh, stride_om, N, HEAD_DIM,
                                  BLOCK_M, USE_TMA, HOST_DESC)
        if USE_TMA:
            acc = tile_load(o_desc, source_index(OSrc, q_order), b, h, m * BLOCK_M, 0, BLOCK_M, HEAD_DIM,
                            HOST_DESC).to(tl.float32)
        else:
            acc = tl.load(o_head + q_rows[:, None] * stride_om + d[None, :], mask=(q_pos < N)[:, None],
                          other=0.0).to(tl.float32)
        if FP8:  # into the units of the fp8 products (448 / V's scale)
            acc = acc * (448.0 / tl.load(VScale + bh))
        m_i = tl.load(Lse + bh.to(tl.int64) * num_q_blocks * BLOCK_M + q_pos)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # -- key blocks: the plan row lists the unmasked ones first (launcher), then the masked ones --
    num_unmasked = num_blocks - num_masked
    if LOOP == 1:  # explicit option (loop="masked"): element mask on every block
        acc, l_i, m_i = attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_head, v_head, Orders, kv_order, bias_row,
                                      idx_row, 0, num_blocks, q_pos, N, prefix, video_end, band, kv_valid, qk_scale,
                                      stride_km, stride_vm, k_scale_row, k_src, v_src, b, h, HEAD_DIM, SUB_N, SPLIT_N,
                                      True, USE_TMA, HAS_BIAS, EVEN_N, UPCAST, False, FP8, QK_INT8, HOST_DESC)
    else:
        if LOOP != 2:
            acc, l_i, m_i = attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_head, v_head, Orders, kv_order,
                                          bias_row, idx_row, num_unmasked, num_blocks, q_pos, N, prefix, video_end,
                                          band, kv_valid, qk_scale, stride_km, stride_vm, k_scale_row, k_src, v_src,
                                          b, h, HEAD_DIM, SUB_N, SPLIT_N, True, USE_TMA, HAS_BIAS, EVEN_N, UPCAST,
                                          False, FP8, QK_INT8, HOST_DESC)
        if LOOP != 3:
            # Last, so that nothing but the epilogue follows the loop that may be warp-specialised (pass 2 only:
            # the pruner keeps WARP_SPECIALIZE off elsewhere). It starts at block 0, like Triton's own kernels.
            # The ragged last key block is always masked, so EVEN_N holds here.
            acc, l_i, m_i = attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_head, v_head, Orders, kv_order,
                                          bias_row, idx_row, 0, num_unmasked, q_pos, N, prefix, video_end, band,
                                          kv_valid, qk_scale, stride_km, stride_vm, k_scale_row, k_src, v_src, b, h,
                                          HEAD_DIM, SUB_N, SPLIT_N, False, USE_TMA, HAS_BIAS, True, UPCAST,
                                          WARP_SPECIALIZE, FP8, QK_INT8, HOST_DESC)

    # -- epilogue: normalise, store rows at their original positions --
    if LOOP == 2:  # base-2 log-sum-exp of the rows for pass 3 (-inf where no key was seen)
        lse = m_i + tl.math.log2(l_i)
        if HOST_DESC:
            LseDesc.store([(bh * num_q_blocks + m) * BLOCK_M], lse)
        elif USE_TMA:
            # A tile store, like the output's: no row vector made before the loop may be used after it, since
            # Triton 3.6's specialisation hands such vectors to the wrong half of the rows (NOTES.md entry 5).
            lse_desc = tl.make_tensor_descriptor(Lse, shape=[tl.num_programs(1) * num_q_blocks * BLOCK_M],
                                                 strides=[1], block_shape=[BLOCK_M])
            lse_desc.store([(bh * num_q_blocks + m) * BLOCK_M], lse)
        else:
            tl.store(Lse + bh.to(tl.int64) * num_q_blocks * BLOCK_M + q_pos, lse)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no visible key (all-masked padding) gives 0
    if FP8:  # back from the units of the fp8 products (a scalar: no vector may cross the specialised loop)
        acc = acc * (tl.load(VScale + bh) / 448.0)
    out = acc / l_i[:, None]
    # Made here, not before the loop, so that the specialised loop carries no output state.
    o_head, o_desc = out_tile(Out, OP, ODesc, b, h, q_order, stride_ob, stride_oh, stride_om, N, HEAD_DIM, BLOCK_M,
                              USE_TMA, HOST_DESC)
    if USE_TMA:
        tile_store(o_desc, source_index(OSrc, q_order), b, h, m * BLOCK_M, out.to(Out.dtype.element_ty), BLOCK_M,
                   HEAD_DIM, HOST_DESC)
    else:
        tl.store(o_head + q_rows[:, None] * stride_om + d[None, :], out.to(Out.dtype.element_ty),
                 mask=(q_pos < N)[:, None])
