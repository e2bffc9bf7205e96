"""Block-sparse attention forward (Triton) that runs every RainFusion head variant of a PlanTable.

One launch serves all (batch, head) pairs, each with its own variant (``variant_of_head``): the
kernel reads the variant's token orders and block plan from the ``PlanTable`` on the device, so
the host never looks at device data (no sync, CUDA-graph friendly).

Semantics (see ``rf_compile.plan``): for head (b, h) with variant p, queries are read in
``orders[q_order[p]]``, keys/values in ``orders[kv_order[p]]``; query position i sees key position
j iff i is a text position, or ``j < kv_valid[p]`` and (``band[p] < 0`` or j is text or
``|i - j| <= band[p]``). Query block m visits the key blocks ``kv_indices[p, m, :kv_num_blocks[p, m]]``.
Output rows go back to their original positions (the inverse permutation is fused in the store).

Two ways of reading permuted rows (``loads=``):

- ``"gather"``: the permutation is fused into the loads (row index = ``orders[o, pos]``, pointer
  loads). Works everywhere, including the Triton interpreter.
- ``"tma"`` (Hopper+; also Triton's interpreter, which emulates descriptors, for CPU tests): a small
  copy kernel first writes the rows of the heads whose order is not the identity into scratch
  tensors in their permuted order; the attention kernel then reads plain tiles through TMA tensor
  descriptors (identity heads read ``q``/``k``/``v`` in place), optionally warp-specialised, and
  stores output tiles the same way: identity heads into ``out``, the others into a scratch whose
  rows the copy kernel puts back. A row-gathered pointer store of a 128 x 128 tile costs 128
  64-bit addresses per thread: with it the kernel spilled (Triton 3.6, sm_90: 296 B of stack at 8
  warps, 1136 B warp-specialised), with the tile store it does not at 8 warps (NOTES.md).

Two ways of walking a query block's key blocks (``loop=``): ``"split"``, one launch, the blocks
that need the element mask, then the whole ones; ``"two_pass"``, the whole blocks in a launch of
their own (the loop Triton 3.6 warp-specialises on Hopper), then the masked ones added to its
tiles through the row log-sum-exp. ``"auto"`` takes ``"two_pass"`` where that pays (d=128).

Not here: the ARM, plan building, dense fallbacks and the custom op (``rf_compile.ops``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rf_compile.config import PRECISIONS
from rf_compile.kernels.fp8_quant import Fp8Copies, quantize_for_attention
from rf_compile.plan import KERNEL_HEAD_DIMS, PlanTable

__all__ = ["block_sparse_attention", "fp8_runs", "gpu_configs", "plan_extras"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_tma() -> bool:
    """TMA tensor descriptors made on the device: Triton >= 3.4 on compute capability >= 9.0."""
    if _INTERPRET or not torch.cuda.is_available() or not hasattr(tl, "make_tensor_descriptor"):
        return False
    return torch.cuda.get_device_capability()[0] >= 9 and hasattr(triton, "set_allocator")


def _tma_runs() -> bool:
    """Where ``loads="tma"`` can run: Hopper, or the interpreter (it emulates tensor descriptors)."""
    return _has_tma() or (_INTERPRET and hasattr(tl, "make_tensor_descriptor"))


def fp8_runs(device: torch.device) -> bool:
    """Whether ``precision="fp8"`` can run on ``device``: TMA loads (Hopper, or the interpreter)."""
    return _tma_runs() and (_INTERPRET or device.type == "cuda")


def _supports_warp_specialize() -> bool:
    """``tl.range(..., warp_specialize=True)`` exists from Triton 3.4 and pays on Hopper only."""
    if not _has_tma():
        return False
    import inspect

    try:
        return "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------
# The block sizes are the plan table's (BLOCK_M x BLOCK_N); only warps / stages / warp
# specialisation are tuned. Measured on H100 (benchmarks/results/nvidia-h100-80gb-hbm3/NOTES.md).


def gpu_configs(warp_specialize: bool) -> list[triton.Config]:
    """The GPU launch configurations (before pruning); ``warp_specialize`` adds the specialised ones."""
    # (warps, stages, key sub-tiles per plan block). H100 run 2 chose w4/s3 + warp specialisation at
    # d=64 and w8/s3 at d=128; SPLIT_N=2 never won (benchmarks/results/nvidia-h100-80gb-hbm3/NOTES.md).
    plain = [(4, 2, 1), (4, 3, 1), (8, 2, 1), (8, 3, 1), (8, 3, 2)]
    configs = [triton.Config({"WARP_SPECIALIZE": False, "SPLIT_N": n}, num_warps=w, num_stages=s) for w, s, n in plain]
    if warp_specialize:  # Triton 3.6: warp specialisation only takes with 4 warps
        configs += [triton.Config({"WARP_SPECIALIZE": True, "SPLIT_N": 1}, num_warps=4, num_stages=s) for s in (2, 3)]
    return configs


def _configs() -> list[triton.Config]:
    if _INTERPRET or not torch.cuda.is_available():
        return [triton.Config({"WARP_SPECIALIZE": False, "SPLIT_N": 1}, num_warps=4, num_stages=1)]
    return gpu_configs(_supports_warp_specialize())


def _prune_configs(configs, named_args, **kwargs):
    """Warp specialisation only with TMA loads; without it, 4 warps at d=128 spill registers (H100:
    255 registers and spills for a 128x64 tile, against none with 8 warps)."""
    args = {**named_args, **kwargs}
    kept = [
        c for c in configs
        if (args.get("USE_TMA") or not c.kwargs.get("WARP_SPECIALIZE"))
        and not (args.get("HEAD_DIM") == 128 and c.num_warps == 4 and not c.kwargs.get("WARP_SPECIALIZE"))
        and not (args.get("HEAD_DIM") == 64 and c.num_warps == 8 and c.num_stages == 2)
        and args.get("BLOCK_N", 128) % (16 * c.kwargs.get("SPLIT_N", 1)) == 0
        # Only the unmasked pass specialises, and only without a key bias: a masked loop, or the
        # bias gathered in the loop, crashes Triton 3.6's specialisation passes (NOTES.md entries 4-5).
        and not (c.kwargs.get("WARP_SPECIALIZE") and (args.get("LOOP") != 2 or args.get("HAS_BIAS")))
    ]
    return kept or configs[:1]


_CONFIGS = _configs()

# Benchmarks set this to a ``triton.Config`` to bypass the autotuner (tuning sweeps).
_FORCED_CONFIG: triton.Config | None = None


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _permute_rows_kernel(
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
def _load_kv(
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
def _attend_blocks(
    acc, l_i, m_i, q,
    K_desc, V_desc, K_head, V_head, Orders, kv_order, Bias_row, idx_row,
    lo, hi, q_pos, N, prefix, video_end, band, kv_valid, qk_scale, stride_km, stride_vm, KScale_row,
    HEAD_DIM: tl.constexpr, SUB_N: tl.constexpr, SPLIT_N: tl.constexpr,
    MASKED: tl.constexpr, USE_TMA: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FP8: tl.constexpr,
):
    """Online softmax over the plan's key blocks ``idx_row[lo:hi]``, each walked in SPLIT_N sub-tiles.

    ``MASKED`` applies the element mask (partial blocks, the ragged last block); without it the
    blocks are taken whole. ``qk_scale`` is in log2 units. ``FP8``: q, k, v are e4m3; each key
    block's scale (``KScale_row``, q's folded into ``qk_scale`` by the caller) rescales its scores,
    and P enters its product as e4m3 times 448 (the caller divides it out with V's scales).
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
        if FP8:
            block_scale = qk_scale * tl.load(KScale_row + kb)
        else:
            block_scale = qk_scale
        for s in tl.static_range(SPLIT_N):
            k, v, k_pos, bias = _load_kv(K_desc, V_desc, K_head, V_head, Orders, kv_order, Bias_row,
                                         kb * SPLIT_N + s, N, stride_km, stride_vm,
                                         HEAD_DIM, SUB_N, USE_TMA, HAS_BIAS, EVEN_N, FP8)
            # -- scores (base 2) --
            if UPCAST:  # the interpreter computes bf16 dots wrongly (bf16 held as uint16 in numpy)
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


@triton.jit
def _out_tile(Out, OP, b, h, q_order, stride_ob, stride_oh, stride_om, N,
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


@triton.autotune(configs=_CONFIGS,
                 key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "N_BUCKET", "USE_TMA", "LOOP", "HAS_BIAS", "FP8"],
                 prune_configs_by={"early_config_prune": _prune_configs},
                 restore_value=["Out", "OP"])  # the fix-up pass (LOOP 3) adds to the tiles it reads
@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, QP, KP, VP, Out, OP, Bias, Lse, QScale, KScale, VScale,
    Orders, QOrder, KVOrder, Band, KVValid,
    KVNum, KVNumMasked, KVIdx, VariantOfHead,
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
):
    """One (query block, batch x head) program. ``LOOP`` (see ``_LOOPS``): 0 masked then unmasked
    blocks, 1 every block masked, 2 the unmasked blocks alone (stores the tile and its base-2
    log-sum-exp in ``Lse``), 3 the masked blocks added to what pass 2 left (programs without
    masked blocks return at once). ``FP8``: Q/K/V are ``fp8_quant``'s e4m3 copies (every head
    reads them in its order; V transposed, [D, n_pad] per head) with their scales."""
    tl.static_assert(BLOCK_N % (16 * SPLIT_N) == 0 and BLOCK_M % 16 == 0, "block sizes must be multiples of 16")
    SUB_N: tl.constexpr = BLOCK_N // SPLIT_N  # key tile: a plan block is walked in SPLIT_N sub-tiles
    m = tl.program_id(0)
    bh = tl.program_id(1)
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
    if USE_TMA:
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

    if LOOP == 3:
        # -- resume from pass 2: its normalised tile and log-sum-exp are the state (acc, l=1, m=lse) --
        o_head, o_desc = _out_tile(Out, OP, b, h, q_order, stride_ob, stride_oh, stride_om, N, HEAD_DIM, BLOCK_M,
                                   USE_TMA)
        if USE_TMA:
            acc = o_desc.load([m * BLOCK_M, 0]).to(tl.float32)
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
        acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_head, v_head, Orders, kv_order, bias_row,
                                       idx_row, 0, num_blocks, q_pos, N, prefix, video_end, band, kv_valid, qk_scale,
                                       stride_km, stride_vm, k_scale_row, HEAD_DIM, SUB_N, SPLIT_N, True, USE_TMA,
                                       HAS_BIAS, EVEN_N, UPCAST, False, FP8)
    else:
        if LOOP != 2:
            acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_head, v_head, Orders, kv_order,
                                           bias_row, idx_row, num_unmasked, num_blocks, q_pos, N, prefix, video_end,
                                           band, kv_valid, qk_scale, stride_km, stride_vm, k_scale_row, HEAD_DIM,
                                           SUB_N, SPLIT_N, True, USE_TMA, HAS_BIAS, EVEN_N, UPCAST, False, FP8)
        if LOOP != 3:
            # Last, so that nothing but the epilogue follows the loop that may be warp-specialised (pass 2 only:
            # the pruner keeps WARP_SPECIALIZE off elsewhere). It starts at block 0, like Triton's own kernels.
            # The ragged last key block is always masked, so EVEN_N holds here.
            acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_head, v_head, Orders, kv_order,
                                           bias_row, idx_row, 0, num_unmasked, q_pos, N, prefix, video_end, band,
                                           kv_valid, qk_scale, stride_km, stride_vm, k_scale_row, HEAD_DIM, SUB_N,
                                           SPLIT_N, False, USE_TMA, HAS_BIAS, True, UPCAST, WARP_SPECIALIZE, FP8)

    # -- epilogue: normalise, store rows at their original positions --
    if LOOP == 2:  # base-2 log-sum-exp of the rows for pass 3 (-inf where no key was seen)
        lse = m_i + tl.math.log2(l_i)
        if USE_TMA:
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
    o_head, o_desc = _out_tile(Out, OP, b, h, q_order, stride_ob, stride_oh, stride_om, N, HEAD_DIM, BLOCK_M, USE_TMA)
    if USE_TMA:
        o_desc.store([m * BLOCK_M, 0], out.to(Out.dtype.element_ty))
    else:
        tl.store(o_head + q_rows[:, None] * stride_om + d[None, :], out.to(Out.dtype.element_ty),
                 mask=(q_pos < N)[:, None])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def plan_extras(table: PlanTable) -> dict[str, torch.Tensor]:
    """Per-table tensors the kernel needs beyond the plan, computed once and cached on the table.

    ``kv_indices``: the plan's key blocks with the ones that need the element mask last (order
    does not matter to the softmax; the unmasked loop then starts at 0, the form Triton's warp
    specialisation handles), ``num_masked``: how many of those there are. A block needs
    the mask when it is not ``block_full`` or it is the ragged last key block (its positions past
    N must be masked even where the plan calls it full).
    """
    cache = table.__dict__.get("_block_sparse_extras")
    if cache is not None:
        return cache
    N, block_n = table.layout.seq_len, table.block_n
    P, Mq, Mk = table.kv_indices.shape
    device = table.kv_indices.device
    live = torch.arange(Mk, device=device) < table.kv_num_blocks[..., None]
    ragged = (table.kv_indices.long() + 1) * block_n > N
    needs_mask = live & (~table.block_full | ragged)
    # Sort key: unmasked blocks 0, masked 1, padding 2 (stable keeps ascending order inside).
    key = torch.where(live, needs_mask.to(torch.int8), torch.full_like(needs_mask, 2, dtype=torch.int8))
    perm = torch.sort(key, dim=-1, stable=True).indices
    cache = {
        "kv_indices": torch.gather(table.kv_indices, -1, perm).to(torch.int32).contiguous(),
        "num_masked": needs_mask.sum(-1, dtype=torch.int32).contiguous(),
        "orders": table.orders.to(torch.int32).contiguous(),
        "kv_num_blocks": table.kv_num_blocks.to(torch.int32).contiguous(),
        "q_order": table.q_order.to(torch.int32).contiguous(),
        "kv_order": table.kv_order.to(torch.int32).contiguous(),
        "band": table.band.to(torch.int32).contiguous(),
        "kv_valid": table.kv_valid.to(torch.int32).contiguous(),
    }
    table.__dict__["_block_sparse_extras"] = cache
    return cache


# loop= option -> the kernel's LOOP passes, in launch order.
_LOOPS = {"split": (0,), "masked": (1,), "two_pass": (2, 3)}
_ALLOCATOR_SET = False


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a global scratch allocator (Triton >= 3.4)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET and not _INTERPRET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides, and unit stride along the head dim."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or (t.stride(-2) * es) % 16 or (t.stride(1) * es) % 16 or (t.stride(0) * es) % 16:
            return False
        if t.data_ptr() % 16:
            return False
    return True


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: PlanTable,
    variant_of_head: torch.Tensor,
    *,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    loads: str = "auto",
    loop: str = "auto",
    precision: str = "bf16",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention of every (batch, head) with its own RainFusion variant.

    Parameters
    ----------
    q, k, v:
        (B, H, N, D) of one dtype (fp16, bf16, or fp32), any strides (diffusers passes views of
        (B, N, H, D) tensors); ``N == table.layout.seq_len``, ``D`` in ``KERNEL_HEAD_DIMS``.
    table:
        Plans of the variants for this layout (``build_plan_table``), on q's device. Its
        ``block_m`` / ``block_n`` are the kernel's tile sizes.
    variant_of_head:
        int32 [B, H] on q's device: the variant id (row of ``table``) of each (batch, head).
        Never read on the host.
    scale:
        Softmax scale (SDPA semantics), default ``1 / sqrt(D)``.
    key_bias:
        Optional float [B, N] additive key bias in the original token order (0 / -inf from a
        key-padding mask), added to the scores of every block.
    loads:
        ``"gather"`` (permutation fused into pointer loads and stores), ``"tma"`` (copy the permuted
        heads once, then TMA tile loads and stores; Hopper, or the interpreter) or ``"auto"`` (TMA
        on Hopper, else gather).
    loop:
        ``"split"``: the blocks that need the element mask first, then the whole ones without it, in
        one launch. ``"two_pass"``: the whole blocks alone in a first launch, the only one that
        Triton 3.6 warp-specialises on Hopper (the masked loop spills at 4 warps or crashes the
        specialisation pass, NOTES.md); it stores each tile and its log-sum-exp, and a second
        launch adds the masked blocks of the query blocks that have any. ``"auto"`` (default):
        ``"two_pass"`` where warp specialisation runs and pays (TMA loads on Hopper, head dim 128,
        no ``key_bias``; H200: 5-15% faster than "split" at d=128, 5-20% slower at d=64, where the
        autotuner keeps 8 warps; not with ``precision="fp8"``), else ``"split"``.
        ``"masked"``: the element mask on every block, trusting no ``block_full`` flag; 1.5-1.9x
        slower on H100 (NOTES.md), kept to check the flags and to measure what skipping the mask
        is worth.
    precision:
        ``"bf16"`` (default): the products in q's dtype. ``"fp8"``: Q K^T and P V in float8 e4m3
        on the tensor cores (Hopper; or Triton's interpreter) from per-block scaled copies
        (``fp8_quant``: K smoothed by its mean, V scaled per head, P times 448), the same
        plans and output dtype; TMA loads only.
    out:
        Optional (B, H, N, D) tensor of q's dtype with unit stride along D to write into.

    Returns
    -------
    Tensor
        (B, H, N, D), q's dtype, allocated with ``torch.empty_like(q)`` (so a (B, N, H, D)-strided
        q gives a (B, N, H, D)-strided output, which diffusers reshapes without a copy).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be (B, H, N, D) of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    if D not in KERNEL_HEAD_DIMS:
        raise ValueError(f"block_sparse_attention supports head dims {KERNEL_HEAD_DIMS}, got {D}: "
                         "use dense attention for this site")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if N != table.layout.seq_len:
        raise ValueError(f"sequence length {N} does not match the plan table's layout "
                         f"{table.layout.describe()} ({table.layout.seq_len} tokens)")
    if not (q.device == k.device == v.device == table.kv_indices.device == variant_of_head.device):
        raise ValueError(f"q, k, v, table and variant_of_head must be on one device; got q on {q.device}, "
                         f"table on {table.kv_indices.device}, variant_of_head on {variant_of_head.device}")
    if variant_of_head.shape != (B, H) or variant_of_head.dtype != torch.int32:
        raise ValueError(f"variant_of_head must be int32 [B, H] = [{B}, {H}], got {variant_of_head.dtype} "
                         f"{list(variant_of_head.shape)}")
    if key_bias is not None and (key_bias.shape != (B, N) or not key_bias.is_floating_point()):
        raise ValueError(f"key_bias must be a float [B, N] = [{B}, {N}] tensor, got {key_bias.dtype} "
                         f"{list(key_bias.shape)}")
    if loads not in ("auto", "gather", "tma"):
        raise ValueError(f"loads must be 'auto', 'gather' or 'tma', got {loads!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    if loop not in (*_LOOPS, "auto"):
        raise ValueError(f"loop must be one of {['auto', *_LOOPS]}, got {loop!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")

    # Unit stride along D lets every row load be vectorised; copy only if a caller breaks it.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    use_tma = loads == "tma" or (loads == "auto" and _has_tma())
    if use_tma and not (_tma_runs() and _tma_ok(q, k, v, *(() if out is None else (out,)))):
        if loads == "tma":
            raise ValueError("loads='tma' needs a Hopper GPU (or Triton's interpreter), Triton with tensor "
                             "descriptors and 16-byte aligned q/k/v/out rows")
        use_tma = False
    if precision == "fp8" and not use_tma:
        raise ValueError("precision='fp8' needs TMA loads: a Hopper GPU (or Triton's interpreter), Triton with "
                         "tensor descriptors and 16-byte aligned q/k/v/out rows")
    if precision == "fp8" and loop == "two_pass":
        raise ValueError("precision='fp8' runs with loop 'split', 'masked' or 'auto': its two_pass form gave NaN "
                         "on the H200 (benchmarks/results/nvidia-h200/NOTES.md, entry 6)")

    if loop == "auto":  # two launches pay only where the first is warp-specialised, measured at d=128
        loop = ("two_pass" if use_tma and key_bias is None and D == 128 and precision != "fp8"
                and _supports_warp_specialize() else "split")
    extras = plan_extras(table)
    voh = variant_of_head.contiguous()
    if out is None:
        out = torch.empty_like(q)
        if out.stride(-1) != 1:
            out = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1 or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} {tuple(q.shape)} tensor on {q.device} with unit stride along D")
    if key_bias is not None:
        bias = key_bias.to(torch.float32)
        stride_biasb = bias.stride(0)
        if bias.stride(1) != 1:
            bias = bias.contiguous()
            stride_biasb = bias.stride(0)
    else:
        bias, stride_biasb = extras["band"], 0  # never read

    copy_block = 64
    copy_grid = (triton.cdiv(N, copy_block), B * H)
    fp8 = None
    if precision == "fp8":  # every head reads e4m3 copies in its order: the quantization does the permuting
        _ensure_tma_allocator()
        fp8 = quantize_for_attention(q, k, v, extras["orders"], extras["q_order"], extras["kv_order"], voh,
                                     table.block_m, table.block_n)
        q, k, v = qp, kp, vp = fp8.q, fp8.k, fp8.v
        op = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
    elif use_tma:
        _ensure_tma_allocator()
        # Scratch with the strides of its source: the kernel addresses both with one set of strides.
        qp, kp, vp, op = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                          for t in (q, k, v, out))  # fmt: skip
        for x, xp, which in ((q, qp, extras["q_order"]), (k, kp, extras["kv_order"]), (v, vp, extras["kv_order"])):
            _permute_rows_kernel[copy_grid](x, xp, extras["orders"], which, voh,
                                            x.stride(0), x.stride(1), x.stride(2), H, N,
                                            HEAD_DIM=D, BLOCK=copy_block, INVERSE=False, num_warps=4)
    else:
        qp, kp, vp, op = q, k, v, out

    P, Mq, Mk = table.kv_indices.shape
    grid = (Mq, B * H)
    # Base-2 log-sum-exp per (batch x head, query position), from pass 2 to pass 3 of "two_pass".
    lse = torch.empty(B * H, Mq * table.block_m, dtype=torch.float32, device=q.device) if loop == "two_pass" else bias
    for loop_pass in _LOOPS[loop]:
        kernel, meta = _block_sparse_fwd_kernel, {}
        if _FORCED_CONFIG is not None and loop_pass != 3:  # the fix-up pass keeps its own tuning
            kernel = _block_sparse_fwd_kernel.fn
            meta = dict(_FORCED_CONFIG.kwargs, num_warps=_FORCED_CONFIG.num_warps,
                        num_stages=_FORCED_CONFIG.num_stages)
        _launch(kernel, grid, meta, (q, k, v, qp, kp, vp, out, op, bias, lse), fp8, extras, voh, stride_biasb,
                table, N, D, scale, loop_pass, key_bias is not None, use_tma)
    if use_tma:  # rows of the permuted-query heads back to their positions
        _permute_rows_kernel[copy_grid](out, op, extras["orders"], extras["q_order"], voh,
                                        out.stride(0), out.stride(1), out.stride(2), H, N,
                                        HEAD_DIM=D, BLOCK=copy_block, INVERSE=True, num_warps=4)
    return out


def _launch(kernel, grid, meta, tensors: tuple, fp8: Fp8Copies | None, extras, voh, stride_biasb,
            table: PlanTable, N: int, D: int, scale: float | None, loop_pass: int, has_bias: bool,
            use_tma: bool) -> None:
    """One launch of the attention kernel (one ``LOOP`` pass) over every (query block, batch x head).

    ``tensors``: q, k, v, their scratch copies, out, its scratch, the bias and the LSE buffer; the
    strides of q, k, v address both a tensor and its copy (with ``fp8``, both are the e4m3 copy).
    """
    q, k, v, qp, kp, vp, out, op, bias, lse = tensors
    H = q.shape[1]
    P, Mq, Mk = table.kv_indices.shape
    if fp8 is None:
        scales, n_pad = (bias, bias, bias), N  # never read
    else:
        scales, n_pad = (fp8.q_scale, fp8.k_scale, fp8.v_scale), fp8.n_pad
    kernel[grid](
        q, k, v, qp, kp, vp, out, op, bias, lse, *scales,
        extras["orders"], extras["q_order"], extras["kv_order"], extras["band"], extras["kv_valid"],
        extras["kv_num_blocks"], extras["num_masked"], extras["kv_indices"], voh,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_biasb,
        H, N, table.layout.prefix, table.layout.prefix + table.layout.video_tokens, Mq, Mk,
        float(scale if scale is not None else D ** -0.5), n_pad,
        N_BUCKET=triton.next_power_of_2(N),
        HEAD_DIM=D, BLOCK_M=table.block_m, BLOCK_N=table.block_n,
        USE_TMA=use_tma, LOOP=loop_pass, HAS_BIAS=has_bias, EVEN_N=N % table.block_n == 0,
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16, FP8=fp8 is not None,
        **meta,
    )
