"""Does Triton keep a Q K^T product in flight across the softmax? Two toy attention loops compiled for sm_90.

FlashAttention-3 overlaps one key block's softmax with the tensor cores' next product inside a warpgroup:
it issues the next block's Q K^T asynchronously and waits for it only after the softmax. The block-sparse
kernel's PTX waits for every ``wgmma`` group before the softmax that follows (``kernel_resources.py``'s
``ex2_under_wgmma`` column: 0), so FP8's faster products leave the softmax on the critical path. This
compiles the plain online-softmax loop and the same loop written with that look-ahead (the next block's
scores computed before this block's softmax, carried to the next iteration) and reports where the
compiler put the waits: whether the look-ahead can be had from plain Triton. A third loop writes the
look-ahead in Gluon (Triton's lower-level language, one warpgroup of 64 rows, bf16), whose
``warpgroup_mma(is_async=True)`` and ``warpgroup_mma_wait`` place the wait by hand. No GPU is needed.

    python benchmarks/wgmma_overlap.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kernel_resources import exponentials_under_wgmma  # noqa: E402
from benchmarks.utils import environment, markdown_table, write_results  # noqa: E402


@triton.jit
def _softmax_step(qk, v, acc, l_i, m_i, qk_scale):
    """One key block of the online softmax, as the block-sparse kernel's unmasked loop does it."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def toy_attention(Q, K, V, Out, n_blocks, qk_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  LOOK_AHEAD: tl.constexpr):  # fmt: skip
    """One query block over ``n_blocks`` key blocks; ``LOOK_AHEAD``: block t+1's scores before block t's softmax."""
    q_desc = tl.make_tensor_descriptor(Q, shape=[BM, D], strides=[D, 1], block_shape=[BM, D])
    k_desc = tl.make_tensor_descriptor(K, shape=[n_blocks * BN, D], strides=[D, 1], block_shape=[BN, D])
    v_desc = tl.make_tensor_descriptor(V, shape=[n_blocks * BN, D], strides=[D, 1], block_shape=[BN, D])
    q = q_desc.load([0, 0])
    m_i = tl.zeros([BM], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    if LOOK_AHEAD:
        qk = tl.dot(q, tl.trans(k_desc.load([0, 0])))
        for t in range(1, n_blocks + 1):
            qk_next = tl.dot(q, tl.trans(k_desc.load([tl.minimum(t, n_blocks - 1) * BN, 0])))
            acc, l_i, m_i = _softmax_step(qk, v_desc.load([(t - 1) * BN, 0]), acc, l_i, m_i, qk_scale)
            qk = qk_next
    else:
        for t in range(0, n_blocks):
            qk = tl.dot(q, tl.trans(k_desc.load([t * BN, 0])))
            acc, l_i, m_i = _softmax_step(qk, v_desc.load([t * BN, 0]), acc, l_i, m_i, qk_scale)
    o_desc = tl.make_tensor_descriptor(Out, shape=[BM, D], strides=[D, 1], block_shape=[BM, D])
    o_desc.store([0, 0], (acc / l_i[:, None]).to(tl.bfloat16))


@gluon.jit
def gluon_look_ahead(Q, K, V, Out, n_blocks, qk_scale, D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
    """``toy_attention``'s look-ahead with the waits placed by hand: block t+1's scores are issued asynchronously,
    block t's softmax and P V follow, and one wait drains both. Plain loads into shared memory (no TMA, one
    buffer of V): the schedule is the subject, not the data movement."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 16])
    rows: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                          order=[1, 0])  # fmt: skip
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16)
    q_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, rows))
    kv_rows = gl.arange(0, BN, layout=gl.SliceLayout(1, rows))
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, rows))
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, D], q_layout, gl.load(Q + q_rows[:, None] * D + dims[None, :]))
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BN, D], kv_layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, D], kv_layout)
    k_smem.index(0).store(gl.load(K + kv_rows[:, None] * D + dims[None, :]))
    fence_async_shared()
    no_scores = gl.zeros([BM, BN], gl.float32, layout=mma)
    qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), no_scores, use_acc=False)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma))
    l_i = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, mma))
    acc = gl.zeros([BM, D], gl.float32, layout=mma)
    for t in range(1, n_blocks + 1):
        ahead = gl.minimum(t, n_blocks - 1)
        k_smem.index(t % 2).store(gl.load(K + (ahead * BN + kv_rows)[:, None] * D + dims[None, :]))
        v_smem.store(gl.load(V + ((t - 1) * BN + kv_rows)[:, None] * D + dims[None, :]))
        fence_async_shared()
        qk_next = warpgroup_mma(q_smem, k_smem.index(t % 2).permute((1, 0)), no_scores, use_acc=False,
                                is_async=True)  # fmt: skip
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        p = gl.exp2(qk * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        p = gl.convert_layout(p.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2))
        acc = warpgroup_mma(p, v_smem, acc * alpha[:, None], is_async=True)
        qk, acc = warpgroup_mma_wait(0, deps=[qk_next, acc])
        m_i = m_new
    out = gl.convert_layout((acc / l_i[:, None]).to(gl.bfloat16), rows)
    gl.store(Out + q_rows[:, None] * D + dims[None, :], out)


def ptx_events(ptx: str) -> str:
    """The PTX's products, waits and exponentials in program order, runs collapsed: "MMAx8 WAIT0 EX2x66 ..."."""
    events: list[list] = []
    for line in ptx.splitlines():
        line = line.strip()
        if line.startswith("wgmma.mma_async"):
            event = "MMA"
        elif line.startswith("wgmma.wait_group"):
            event = "WAIT" + line.rstrip(";").split()[-1]
        elif line.startswith("ex2.approx"):
            event = "EX2"
        else:
            continue
        if events and events[-1][0] == event:
            events[-1][1] += 1
        else:
            events.append([event, 1])
    return " ".join(f"{event}x{n}" if n > 1 else event for event, n in events)


def _signature(element: str) -> dict[str, str]:
    """Argument types the toy loops share: inputs of ``element``, a bf16 output, their sizes as constants."""
    return {"Q": element, "K": element, "V": element, "Out": "*bf16", "n_blocks": "i32", "qk_scale": "fp32",
            "D": "constexpr", "BM": "constexpr", "BN": "constexpr"}  # fmt: skip


def compile_toy(look_ahead: bool, precision: str, warps: int, stages: int) -> dict:
    element = {"bf16": "*bf16", "fp8": "*fp8e4nv"}[precision]
    signature = {**_signature(element), "LOOK_AHEAD": "constexpr"}
    constants = {"D": 128, "BM": 128, "BN": 128, "LOOK_AHEAD": look_ahead}
    kernel = triton.compile(ASTSource(fn=toy_attention, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    return {"loop": "look-ahead" if look_ahead else "plain", "precision": precision, "warps": warps, "stages": stages,
            "ex2_under_wgmma": exponentials_under_wgmma(ptx), "ptx_events": ptx_events(ptx)}  # fmt: skip


def compile_gluon() -> dict:
    sizes = {"D": 128, "BM": 64, "BN": 128}
    source = GluonASTSource(fn=gluon_look_ahead, signature=_signature("*bf16"), constexprs=sizes)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    return {"loop": "look-ahead (Gluon)", "precision": "bf16", "warps": 4, "stages": "by hand",
            "ex2_under_wgmma": exponentials_under_wgmma(ptx), "ptx_events": ptx_events(ptx)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    parser.add_argument("--stem", default="wgmma_overlap")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("wgmma_overlap.py compiles for sm_90: unset TRITON_INTERPRET")
    records = [compile_toy(look_ahead, precision, 8, stages)
               for precision in args.precisions for stages in args.stages for look_ahead in (False, True)]
    records.append(compile_gluon())
    for record in records:
        print(record, flush=True)
    env = environment()
    markdown = (
        f"# Softmax under the tensor cores? Toy attention loops for sm_90 (compiled offline, triton "
        f"{triton.__version__})\n\nCommand: `{env['command']}`\n\nOne query block of 128 rows, head dim 128, 8 warps, "
        "TMA loads (the Gluon loop: 64 rows, one warpgroup, plain loads). `ex2_under_wgmma`: exponentials placed "
        "while a `wgmma` group may still run; `ptx_events`: products (MMA), waits (WAITn: until n groups remain) "
        "and exponentials (EX2) in program order.\n\n"
        f"{markdown_table(records, list(records[0]))}\n"
    )
    write_results(args.out, args.stem, env, records, markdown)


if __name__ == "__main__":
    main()
