"""Registers and spills of the block-sparse kernel per launch configuration, compiled for sm_90 on any machine.

Triton compiles for a target without a GPU (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``) and
ships ``cuobjdump``, which reads the cubin's resource usage: registers per thread and the stack
frame, where spilled registers go (``STACK`` > 0: spills, or local arrays). This checks, before a
device run is spent, whether a kernel change removes spills: the question the H200 runs raised
(``benchmarks/results/nvidia-h200/NOTES.md``). Each configuration the autotuner may keep for TMA
loads, under each kernel pass (``split``: masked blocks first, then the unmasked loop;
``masked``: one loop; ``unmasked`` and ``fixup``: the two launches of ``loop="two_pass"``). The
Triton version matters: the device runs the one in the environment.

    python benchmarks/kernel_resources.py --out benchmarks/results/cpu
    python benchmarks/kernel_resources.py --head-dims 128 --loops unmasked --configs w8/s2/ws1/n1 w4/s2/ws1/n1

``--configs`` compiles the named configurations instead of the launcher's kept ones: does one it prunes
(8 warps specialised, say) form its partitions with this Triton?

``--kernel block_select`` does the same for v2's fused block selection, at the launch shape its
launcher picks per number of key blocks (``block_select.launch_shape``), top-k and mass rules.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.utils import config_name, environment, markdown_table, write_results  # noqa: E402
from rf_compile.kernels import block_select, sparse_config, sparse_loop, sparse_tiles  # noqa: E402

TENSORS = {"Q", "K", "V", "QP", "KP", "VP", "Out", "OP"}  # bf16 tensors; the other capitalised arguments are int32
SCALARS = {"H", "N", *(name for name in sparse_tiles.HOST_DESCRIPTOR_ARGS if name.endswith("Src"))}
DESCRIPTORS = {name for name in sparse_tiles.HOST_DESCRIPTOR_ARGS if name.endswith("Desc")}  # descriptors="host"
# Kernel passes by name (``block_sparse._LOOPS``): loop="two_pass" launches "unmasked" then "fixup".
PASSES = {"split": 0, "masked": 1, "unmasked": 2, "fixup": 3}


# Element types of the attention inputs and their copies per ``precision`` (the output stays bf16).
INPUT_TYPES = {"bf16": ("*bf16", "*bf16"), "fp8": ("*fp8e4nv", "*fp8e4nv"), "int8": ("*i8", "*fp8e4nv")}


def signature(fn, constants: dict, precision: str = "bf16") -> dict[str, str]:
    """Triton types of the kernel's arguments (bf16 or 8-bit attention inputs, int32 plans, fp32 bias and scale;
    with ``HOST_DESCRIPTORS``, the host-made descriptors' tiles as ``sparse_config.descriptor_blocks`` sets them)."""
    qk_type, v_type = INPUT_TYPES[precision]
    blocks = {}
    if constants.get("HOST_DESCRIPTORS"):
        blocks = dict(constants)
        for name in DESCRIPTORS - {"LseDesc"}:
            blocks[name] = types.SimpleNamespace(block_shape=None)  # what descriptor_blocks sets
        sparse_config.descriptor_blocks(blocks)

    def kind(name: str) -> str:
        if name in constants:
            return "constexpr"
        if name == "LseDesc" and blocks:
            return f"tensordesc<fp32[{constants['BLOCK_M']}]>"
        if name in blocks and name in DESCRIPTORS:
            element = {"QDesc": qk_type, "KDesc": qk_type, "VDesc": v_type}.get(name, "*bf16")[1:]
            return f"tensordesc<{element}{blocks[name].block_shape}>"
        if name in ("Q", "K", "QP", "KP"):
            return qk_type
        if name in ("V", "VP"):
            return v_type
        if name in TENSORS:
            return "*bf16"
        if name in ("Bias", "Lse", "QScale", "KScale", "VScale"):
            return "*fp32"
        if name[0].isupper() and name not in SCALARS:
            return "*i32"
        return "fp32" if name == "qk_scale" else "i32"

    return {name: kind(name) for name in fn.arg_names}


def resources(config: triton.Config, head_dim: int, loop: str, target: GPUTarget, precision: str = "bf16",
              descriptors: str = "device") -> dict:
    """Compile one configuration and read its resource usage from the cubin."""
    fn = sparse_loop.block_sparse_fwd_kernel.fn
    constants = dict(N_BUCKET=65536, HEAD_DIM=head_dim, BLOCK_M=128, BLOCK_N=128, USE_TMA=True,
                     LOOP=PASSES[loop], HAS_BIAS=False, EVEN_N=True, UPCAST=False, FP8=precision != "bf16",
                     QK_INT8=precision == "int8", HOST_DESCRIPTORS=descriptors == "host", **config.kwargs)  # fmt: skip
    types = signature(fn, constants, precision)
    kernel = triton.compile(ASTSource(fn=fn, signature=types, constexprs=constants), target=target,
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages})  # fmt: skip
    regs, stack = cubin_usage(kernel)
    return {
        "precision": precision, "descriptors": descriptors, "head_dim": head_dim, "loop": loop,
        "config": config_name(config),
        "registers": regs, "stack_bytes": stack, "shared_bytes": kernel.metadata.shared,
        # Specialised for real when partitions added warps: the loop's attribute stays in the TTGIR even
        # where the pass gave up (it did for a descriptor made from an scf.if-yielded pointer).
        "warps": kernel.metadata.num_warps, "warp_specialized": kernel.metadata.num_warps > config.num_warps,
        # Descriptors made in the program: each a tensormap write and fence pair (none with host-made ones).
        "tensormap_fences": kernel.asm["ptx"].count("fence.proxy.tensormap"),
        "ex2_under_wgmma": exponentials_under_wgmma(kernel.asm["ptx"]),
        **partitions(kernel.asm["ttgir"]),
    }  # fmt: skip


def partitions(ttgir: str) -> dict:
    """The specialised partitions' warps beside the default group's, the registers they request, and the rows of
    the consumers' score tiles (``-`` where nothing was specialised)."""
    warps = re.findall(r"\bnum_warps\((\d+)\)", ttgir)
    registers = re.search(r"requestedRegisters = array<i32: ([\d, ]+)>", ttgir)
    tiles = {int(rows) for rows in re.findall(r"tensor<(\d+)x\d+xf32, #mma", ttgir)} if warps else set()
    return {"partition_warps": "+".join(warps) or "-", "partition_registers": registers.group(1) if registers else "-",
            "mma_tile_rows": "/".join(map(str, sorted(tiles))) or "-"}  # fmt: skip


def exponentials_under_wgmma(ptx: str) -> int:
    """Exponentials placed while a committed ``wgmma`` group may still run (before the ``wait_group`` that drains
    it), in program order: FlashAttention-3's overlap of one block's softmax with the tensor cores' next product.
    0: every product is waited for before the softmax that follows it."""
    in_flight, count = False, 0
    for line in ptx.splitlines():
        line = line.strip()
        if line.startswith("wgmma.commit_group"):
            in_flight = True
        elif line.startswith("wgmma.wait_group"):
            in_flight = line.rstrip(";").split()[-1] != "0"
        elif line.startswith("ex2.approx"):
            count += in_flight
    return count


def parse_config(name: str) -> triton.Config:
    """``w8/s2/ws1/n1`` (``benchmarks.utils.config_name``'s form) as the launcher's configuration."""
    match = re.fullmatch(r"w(\d+)/s(\d+)/ws([01])/n(\d+)", name)
    if match is None:
        raise argparse.ArgumentTypeError(f"configuration {name!r}: expected wWARPS/sSTAGES/ws0|ws1/nSPLIT, "
                                         "e.g. w8/s2/ws1/n1")  # fmt: skip
    warps, stages, specialise, split = (int(group) for group in match.groups())
    return sparse_config.launch_config(bool(specialise), split, warps, stages)


def cubin_usage(kernel) -> tuple[int, int]:
    """(registers per thread, stack bytes) of a compiled kernel, read from its cubin."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return int(regs), int(stack)


def select_resources(blocks: int, mass: bool, head_dim: int, target: GPUTarget, lane_dim: int | None = None) -> dict:
    """Compile the block selection as its launcher would for rows of ``blocks`` key blocks."""
    fn = block_select._block_select_kernel
    m_pad, block_q, warps = block_select.launch_shape(blocks)
    lane_dim = block_select._lane_dim() if lane_dim is None else lane_dim
    constants = dict(HEAD_DIM=head_dim, BLOCK_Q=block_q, M_PAD=m_pad, LANES=block_select._LANES, MASS=mass,
                     LANE_DIM=lane_dim, CHUNK_DIM=2 - lane_dim,
                     HAS_DENSE=True, PER_PLAN_KEEP=False, ONE_BITS=block_select._ONE_BITS,
                     STEPS=block_select._BISECT_STEPS,
                     stride_qd=1, stride_km=1)  # fmt: skip  (query means [P, M, D], key means [P, D, M])
    types = {"PooledQ": "*fp32", "PooledK": "*fp32", "NumBlocks": "*i32", "Indices": "*i32", "mass": "fp32",
             "qk_scale": "fp32", "Always": "*u8", "Dense": "*u8", "Keep": "*i32", "Full": "*u8"}  # fmt: skip
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names}
    # Specialised as at run time: 16-byte aligned pointers, and the integers a launch at this size passes
    # marked divisible by 16 where they are, unless the kernel opts out (``do_not_specialize``: M = 256
    # once crashed Triton 3.6 there).
    values = dict(stride_qp=blocks * head_dim, stride_qm=head_dim, stride_kp=head_dim * blocks, stride_kd=blocks,
                  M=blocks, keep=max(1, blocks // 5))  # fmt: skip
    opted_out = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name][0] == "*" or (name in values and name not in opted_out and values[name] % 16 == 0)}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs), target=target,
                            options={"num_warps": warps})  # fmt: skip
    regs, stack = cubin_usage(kernel)
    return {"blocks": blocks, "m_pad": m_pad, "block_q": block_q, "num_warps": warps, "lane_dim": lane_dim,
            "select": "mass" if mass else "topk", "registers": regs, "stack_bytes": stack,
            "shared_bytes": kernel.metadata.shared}  # fmt: skip


def main_select(args, target: GPUTarget) -> None:
    records = []
    for lane_dim in (block_select._lane_dim(), 2 - block_select._lane_dim()):  # the launcher's, then the other
        for blocks in args.blocks:
            for mass in (False, True):
                records.append(select_resources(blocks, mass, 128, target, lane_dim))
                print(records[-1], flush=True)
    env = environment()
    columns = ["lane_dim", "blocks", "m_pad", "block_q", "num_warps", "select", "registers", "stack_bytes",
               "shared_bytes"]
    markdown = (
        f"# v2 block selection kernel resources for sm_90 (compiled offline, triton {triton.__version__})\n\n"
        f"Command: `{env['command']}`\n\nHead dim 128, the launcher's shape per row length, with the launcher's "
        "tile dim of the lanes (first rows) and the other one; `stack_bytes` > 0: registers spilled to local "
        "memory.\n\n"
        f"{markdown_table(records, columns)}\n"
    )
    write_results(args.out, args.stem, env, records, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", nargs="+", type=int, default=[128, 64], choices=[64, 128])
    parser.add_argument("--loops", nargs="+", default=list(PASSES), choices=list(PASSES),
                        help="kernel passes: split, masked, and two_pass's unmasked and fixup launches")
    parser.add_argument("--max-configs", type=int, default=None, help="only the first N kept configurations")
    parser.add_argument("--configs", nargs="+", type=parse_config, default=None, metavar="wW/sS/wsX/nN",
                        help="compile these launch configurations instead of the launcher's kept ones (warps, "
                             "stages, warp specialisation 0|1, key sub-tiles), e.g. w8/s2/ws1/n1: to see what a "
                             "configuration the launcher prunes would compile to")  # fmt: skip
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=list(INPUT_TYPES),
                        help="the kernel's input precision (its `precision` option)")
    parser.add_argument("--descriptors", nargs="+", default=["host"], choices=["device", "host"],
                        help="who makes the TMA descriptors (the kernel's `descriptors` option; its default, auto, "
                             "is the host's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    parser.add_argument("--stem", default="kernel_resources")
    parser.add_argument("--kernel", default="block_sparse", choices=["block_sparse", "block_select"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[591, 256, 300, 1024, 2048, 37],
                        help="block_select: key blocks per row (591: Wan2.1 720p at 128-token blocks)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_resources.py compiles for sm_90: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", 90, 32)
    if args.kernel == "block_select":
        return main_select(args, target)
    records = []
    for precision, descriptors in ((p, d) for p in args.precisions for d in args.descriptors):
        for head_dim in args.head_dims:
            for loop in args.loops:
                kept = args.configs or sparse_config.prune_configs(
                    sparse_config.gpu_configs(warp_specialize=True),
                    {"HEAD_DIM": head_dim, "BLOCK_N": 128, "USE_TMA": True, "LOOP": PASSES[loop]})  # fmt: skip
                for config in kept[: args.max_configs]:
                    records.append(resources(config, head_dim, loop, target, precision, descriptors))
                    print(records[-1], flush=True)
    env = environment()
    columns = ["precision", "descriptors", "head_dim", "loop", "config", "registers", "stack_bytes", "shared_bytes",
               "warps", "warp_specialized", "tensormap_fences", "ex2_under_wgmma", "partition_warps",
               "partition_registers", "mma_tile_rows"]
    markdown = (
        f"# Block-sparse kernel resources for sm_90 (compiled offline, triton {triton.__version__})\n\n"
        f"Command: `{env['command']}`\n\nTMA loads and stores, 128 x 128 blocks; `stack_bytes` > 0: "
        "registers spilled to local memory; Hopper allows 232,448 shared bytes a block.\n\n"
        f"{markdown_table(records, columns)}\n"
    )
    write_results(args.out, args.stem, env, records, markdown)


if __name__ == "__main__":
    main()
