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

Two ways of making the TMA descriptors (``descriptors=``): ``"device"``, each program makes its four (Q, K,
V and output tiles of its head, in the tensor or the scratch copy) in global scratch, fenced before its first
load; ``"host"``, the launcher makes one per tensor and scratch pair (``sparse_tiles.paired_descriptor``) and
programs only compute coordinates.

Two ways of walking a query block's key blocks (``loop=``): ``"split"``, one launch, the blocks
that need the element mask, then the whole ones; ``"two_pass"``, the whole blocks in a launch of
their own (the loop Triton 3.6 warp-specialises on Hopper), then the masked ones added to its
tiles through the row log-sum-exp. ``"auto"`` takes ``"two_pass"`` where that pays (d=128).

This module is the launcher (checks, scratch copies, passes). The kernel lives in ``sparse_loop``,
its tile copies and loads in ``sparse_tiles``, where it runs and its autotuned configurations in
``sparse_config``. Not here: the ARM, plan building, dense fallbacks and the custom op
(``rf_compile.ops``).
"""

from __future__ import annotations

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from rf_compile.config import PRECISIONS
from rf_compile.kernels.fp8_quant import QuantizedCopies, quantize_for_attention
from rf_compile.kernels.sparse_config import (
    INTERPRET,
    descriptor_blocks,
    fp8_runs,
    gpu_configs,
    has_tma,
    supports_warp_specialize,
    tma_runs,
)
from rf_compile.kernels.sparse_loop import block_sparse_fwd_kernel
from rf_compile.kernels.sparse_tiles import HOST_DESCRIPTOR_ARGS, host_descriptors, permute_rows_kernel
from rf_compile.plan import KERNEL_HEAD_DIMS, PlanTable, heavy_first_order, lists_masked_last

__all__ = ["DESCRIPTORS", "SCHEDULES", "block_sparse_attention", "fp8_runs", "gpu_configs", "launch_order",
           "permuted_inputs", "plan_extras", "restore_rows"]

# Benchmarks set this to a ``triton.Config`` to bypass the autotuner (tuning sweeps).
_FORCED_CONFIG: triton.Config | None = None


def plan_extras(table: PlanTable) -> dict[str, torch.Tensor]:
    """Per-table tensors the kernel needs beyond the plan, computed once and cached on the table.

    ``kv_indices``: the plan's key blocks with the ones that need the element mask last, ``num_masked``: how
    many of those there are (``plan.lists_masked_last``; the table's own ``masked_last`` where its builder made
    them). ``q_blocks_heavy_first`` / ``num_heavy``: the launch order of ``schedule="heavy_first"``
    (``work_item``; the table's ``schedule`` where known).
    A table that brings both makes this a few lookups: v2 builds one each call, possibly in a CUDA graph.
    """
    cache = table.__dict__.get("_block_sparse_extras")
    if cache is not None:
        return cache
    Mk = table.kv_indices.shape[-1]
    kv_indices, num_masked = table.masked_last or lists_masked_last(
        table.kv_indices, table.kv_num_blocks, table.block_full, table.layout.seq_len, table.block_n)
    order, num_heavy = table.schedule or heavy_first_order((table.kv_num_blocks >= Mk).all(0))
    cache = {
        "q_blocks_heavy_first": order,
        "num_heavy": num_heavy,
        "kv_indices": kv_indices.to(torch.int32).contiguous(),
        "num_masked": num_masked.to(torch.int32).contiguous(),
        "orders": table.orders.to(torch.int32).contiguous(),
        "kv_num_blocks": table.kv_num_blocks.to(torch.int32).contiguous(),
        "q_order": table.q_order.to(torch.int32).contiguous(),
        "kv_order": table.kv_order.to(torch.int32).contiguous(),
        "band": table.band.to(torch.int32).contiguous(),
        "kv_valid": table.kv_valid.to(torch.int32).contiguous(),
    }
    table.__dict__["_block_sparse_extras"] = cache
    return cache


# Rows and warps per program of the row copies. Their time, next to the kernel's: ``benchmarks/attention.py``'s
# ``copies_ms`` (v2's tile order copies every head), which ``--copy-launches`` times at other values.
COPY_LAUNCH = (64, 4)

# schedule= option values: the query-block order work_item reads (plan_extras' heavy-first one, or the grid's).
SCHEDULES = ("heavy_first", "grid")

# descriptors= option values: who makes the TMA descriptors ("auto": the host where it can, else the device).
DESCRIPTORS = ("device", "host", "auto")
# loop= option -> the kernel's LOOP passes, in launch order.
_LOOPS = {"split": (0,), "masked": (1,), "two_pass": (2, 3)}
_ALLOCATOR_SET = False


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a global scratch allocator (Triton >= 3.4)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET and not INTERPRET:
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
    schedule: str = "heavy_first",
    descriptors: str = "auto",
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
        autotuner keeps 8 warps; every precision since the 3-stage specialised launch that gave NaN was
        pruned, ``benchmarks/stress_two_pass.py``), else ``"split"``.
        ``"masked"``: the element mask on every block, trusting no ``block_full`` flag; 1.5-1.9x
        slower on H100 (NOTES.md), kept to check the flags and to measure what skipping the mask
        is worth.
    precision:
        ``"bf16"`` (default): the products in q's dtype. ``"fp8"``: Q K^T and P V in float8 e4m3
        on the tensor cores (Hopper; or Triton's interpreter) from per-block scaled copies
        (``fp8_quant``: K smoothed by its mean, V scaled per head, P times 448), the same
        plans and output dtype; TMA loads only. ``"int8"``: the same, but Q K^T in int8 (K with
        one scale per head), 2.5x less error than e4m3 scores (``fp8_quant``).
    schedule:
        The order programs start in. ``"heavy_first"`` (default): the query blocks that see every key block
        in every plan (text rows) of every head first, then the others head by head, so that the longest
        programs do not end the kernel alone (``work_item``). ``"grid"``: head by head, query blocks in order.
    descriptors:
        Who makes the TMA descriptors (TMA loads only). ``"device"``: each program makes its own four, each a
        write to global scratch and a GPU-scope fence pair before its first load. ``"host"``: the launcher
        makes one per tensor and its scratch copy (``sparse_tiles.paired_descriptor``); it raises where they
        lie 2^40 bytes apart or more. ``"auto"`` (default): the host where it can, else the device. The
        outputs are bit-identical; the host's are 0.99-1.13x as fast on H100 (a program's fixed cost 3.8 -> 2.3
        dense key blocks at CogVideoX; v2's kernel at 80% 1.04-1.06x in tiles order, 0.99-1.04x in tokens order,
        band density 0.2 1.05-1.13x; NOTES.md). The
        warp-specialised launch always makes its own (Triton 3.6's specialisation fails on the host form).
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
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if descriptors not in DESCRIPTORS:
        raise ValueError(f"descriptors must be one of {list(DESCRIPTORS)}, got {descriptors!r}")

    # Unit stride along D lets every row load be vectorised; copy only if a caller breaks it.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    use_tma = loads == "tma" or (loads == "auto" and has_tma())
    if use_tma and not (tma_runs() and _tma_ok(q, k, v, *(() if out is None else (out,)))):
        if loads == "tma":
            raise ValueError("loads='tma' needs a Hopper GPU (or Triton's interpreter), Triton with tensor "
                             "descriptors and 16-byte aligned q/k/v/out rows")
        use_tma = False
    if precision != "bf16" and not use_tma:
        raise ValueError(f"precision={precision!r} needs TMA loads: a Hopper GPU (or Triton's interpreter), Triton "
                         "with tensor descriptors and 16-byte aligned q/k/v/out rows")

    if loop == "auto":  # two launches pay only where the first is warp-specialised, measured at d=128
        loop = ("two_pass" if use_tma and key_bias is None and D == 128 and supports_warp_specialize()
                else "split")
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

    copies = None
    if precision != "bf16":  # every head reads 8-bit copies in its order: the quantization does the permuting
        _ensure_tma_allocator()
        copies = quantize_for_attention(q, k, v, extras["orders"], extras["q_order"], extras["kv_order"], voh,
                                        table.block_m, table.block_n, qk_int8=precision == "int8")
        q, k, v = qp, kp, vp = copies.q, copies.k, copies.v
        op = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
    elif use_tma:
        _ensure_tma_allocator()
        qp, kp, vp, op = permuted_inputs(q, k, v, out, extras, voh)
    else:
        qp, kp, vp, op = q, k, v, out

    P, Mq, Mk = table.kv_indices.shape
    grid = (Mq, B * H)
    # Base-2 log-sum-exp per (batch x head, query position), from pass 2 to pass 3 of "two_pass".
    lse = torch.empty(B * H, Mq * table.block_m, dtype=torch.float32, device=q.device) if loop == "two_pass" else bias
    tensors = (q, k, v, qp, kp, vp, out, op, bias, lse)
    host = None
    if use_tma and descriptors != "device":
        host = host_descriptors(tensors, lse if loop == "two_pass" else None, N, table.block_m, copies is not None)
    if descriptors == "host" and use_tma and host is None:
        raise ValueError("descriptors='host' needs q, k, v and out within 2^40 bytes of their scratch copies "
                         "(one TMA descriptor spans both); use descriptors='auto' to fall back to the device")
    for loop_pass in _LOOPS[loop]:
        kernel, meta = block_sparse_fwd_kernel, {}
        if _FORCED_CONFIG is not None and loop_pass != 3:  # the fix-up pass keeps its own tuning
            kernel = block_sparse_fwd_kernel.fn
            meta = dict(_FORCED_CONFIG.kwargs, num_warps=_FORCED_CONFIG.num_warps,
                        num_stages=_FORCED_CONFIG.num_stages)
        _launch(kernel, grid, meta, tensors, copies, extras, voh, stride_biasb, table, N, D, scale, loop_pass,
                key_bias is not None, use_tma, schedule, host)
    if use_tma:
        restore_rows(out, op, extras, voh)
    return out


def permuted_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, extras: dict, voh):
    """TMA loads: scratch copies of q, k, v with the rows of every head whose order is not the identity in
    that order (``plan_extras``), and the output scratch those heads' tiles go to. The scratch has its
    source's strides: the kernel addresses both with one set."""
    qp, kp, vp, op = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                      for t in (q, k, v, out))  # fmt: skip
    for x, xp, which in ((q, qp, extras["q_order"]), (k, kp, extras["kv_order"]), (v, vp, extras["kv_order"])):
        _permute_heads(x, xp, extras, which, voh, inverse=False)
    return qp, kp, vp, op


def restore_rows(out: torch.Tensor, op: torch.Tensor, extras: dict, voh: torch.Tensor) -> None:
    """The output rows of the heads whose queries were permuted, from the scratch ``op`` back to their positions."""
    _permute_heads(out, op, extras, extras["q_order"], voh, inverse=True)


def _permute_heads(x: torch.Tensor, xp: torch.Tensor, extras: dict, which: torch.Tensor, voh: torch.Tensor,
                   inverse: bool) -> None:
    """xp[b, h, pos] = x[b, h, orders[o, pos]] for the heads whose order o (``which`` of their variant) is not
    the identity; ``inverse``: the other way (output rows back to their positions)."""
    B, H, N, D = x.shape
    rows, warps = COPY_LAUNCH
    permute_rows_kernel[(triton.cdiv(N, rows), B * H)](
        x, xp, extras["orders"], which, voh, x.stride(0), x.stride(1), x.stride(2), H, N,
        HEAD_DIM=D, BLOCK=rows, INVERSE=inverse, num_warps=warps,
    )


def launch_order(extras: dict, schedule: str, num_q_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query-block order and heavy count ``work_item`` reads for option ``schedule``."""
    if schedule == "heavy_first":
        return extras["q_blocks_heavy_first"], extras["num_heavy"]
    device = extras["num_heavy"].device  # "grid": made per call (a benchmark's option), so never in a graph's pool
    in_order = torch.arange(num_q_blocks, dtype=torch.int32, device=device)
    return in_order, torch.zeros(1, dtype=torch.int32, device=device)


def _launch(kernel, grid, meta, tensors: tuple, copies: QuantizedCopies | None, extras, voh, stride_biasb,
            table: PlanTable, N: int, D: int, scale: float | None, loop_pass: int, has_bias: bool,
            use_tma: bool, schedule: str, host: dict | None) -> None:
    """One launch of the attention kernel (one ``LOOP`` pass) over every (query block, batch x head).

    ``tensors``: q, k, v, their scratch copies, out, its scratch, the bias and the LSE buffer; the
    strides of q, k, v address both a tensor and its copy (with 8-bit ``copies``, both are that copy).
    ``host``: the host-made descriptors and pair codes (``sparse_tiles.host_descriptors``), or None (programs
    make their own).
    """
    q, k, v, qp, kp, vp, out, op, bias, lse = tensors
    H = q.shape[1]
    P, Mq, Mk = table.kv_indices.shape
    if copies is None:
        scales, n_pad = (bias, bias, bias), N  # never read
    else:
        scales, n_pad = (copies.q_scale, copies.k_scale, copies.v_scale), copies.n_pad
    if host is None:
        host = {name: 0 if name.endswith("Src") else bias for name in HOST_DESCRIPTOR_ARGS}  # never read
    constants = dict(HEAD_DIM=D, BLOCK_M=table.block_m, BLOCK_N=table.block_n, FP8=copies is not None,
                     HOST_DESCRIPTORS=isinstance(host["QDesc"], TensorDescriptor))
    if "SPLIT_N" in meta:  # a forced configuration bypasses the autotuner and so its pre-launch hook
        descriptor_blocks({**host, **constants, **meta})
    kernel[grid](
        q, k, v, qp, kp, vp, out, op, bias, lse, *scales,
        extras["orders"], extras["q_order"], extras["kv_order"], extras["band"], extras["kv_valid"],
        extras["kv_num_blocks"], extras["num_masked"], extras["kv_indices"], voh, *launch_order(extras, schedule, Mq),
        *(host[name] for name in HOST_DESCRIPTOR_ARGS),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_biasb,
        H, N, table.layout.prefix, table.layout.prefix + table.layout.video_tokens, Mq, Mk,
        float(scale if scale is not None else D ** -0.5), n_pad,
        N_BUCKET=triton.next_power_of_2(N), USE_TMA=use_tma, LOOP=loop_pass, HAS_BIAS=has_bias,
        EVEN_N=N % table.block_n == 0, UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        QK_INT8=copies is not None and copies.qk_int8, **constants, **meta,
    )
