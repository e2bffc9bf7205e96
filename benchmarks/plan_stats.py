"""Where the kernel's time can go, from the plans alone (CPU): how many key blocks need the element mask.

For each benchmark shape and head pattern of ``attention.py``: the block density, the share of
visited key blocks that take the masked loop (partial band blocks, text/video edges, the ragged
last block), and the most that making the mask free could save, if a masked block costs
``--masked-cost`` unmasked ones (H100: ``loop="masked"`` ran 1.5-1.9x slower than unmasked blocks,
``benchmarks/results/nvidia-h100-80gb-hbm3/NOTES.md``). It answers whether cheaper masks can close
the gap between the kernel's efficiency and the Triton ceiling (issue 15) before a GPU run is spent.

And how long the kernel's last programs run alone: programs start in the kernel's order (``schedule``, mirroring
``work_item``) on an H100's resident programs (``SLOTS``: 2 an SM at d=64, ncu; 1 at d=128), each lasting its key
blocks plus ``--program-fixed`` blocks; ``tail_<schedule>`` is the makespan's excess over perfectly even work,
as a share of it (list scheduling: a program starts on the first slot to free up). ``--v2`` adds RainFusion
2.0's plans, predicted from random inputs.

    python benchmarks/plan_stats.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.attention import PATTERNS, SHAPES, pattern_plan  # noqa: E402
from benchmarks.utils import environment, markdown_table, write_results  # noqa: E402
from rf_compile.config import ORDERS  # noqa: E402
from rf_compile.kernels.block_sparse import SCHEDULES, launch_order, plan_extras  # noqa: E402

SLOTS = {64: 264, 128: 132}  # resident programs on an H100 (132 SMs) per head dim


def start_order(extras: dict, heads: int, schedule: str) -> list[tuple[int, int]]:
    """(batch x head, query block) of each program in the order the kernel starts them: ``work_item``'s mapping
    of launch index to work, with ``schedule``'s query-block order and heavy count (``launch_order``)."""
    order, heavy = launch_order(extras, schedule, len(extras["q_blocks_heavy_first"]))
    order, heavy = order.tolist(), int(heavy)
    q_blocks, light = len(order), max(len(order) - heavy, 1)
    work = []
    for item in range(heads * q_blocks):
        if item < heavy * heads:
            work.append((item % heads, order[item // heads]))
        else:
            rest = item - heavy * heads
            work.append((rest // light, order[heavy + rest % light]))
    return work


def launch_tail(durations: list[float], slots: int) -> float:
    """Makespan of ``durations`` started in order on ``slots`` slots, over the even split's, minus 1."""
    ends = [0.0] * slots
    heapq.heapify(ends)
    for d in durations:
        heapq.heappush(ends, heapq.heappop(ends) + d)
    return max(ends) / (sum(durations) / slots) - 1


def plan_of(pattern: str, layout, heads: int, head_dim: int):
    """(table, variant_of_head) of an ``attention.py`` pattern, or of ``"v2 s=<sparsity> <order>"``: RainFusion
    2.0's plans predicted from random q and k (seed 0; its forced text blocks are the random inputs' too)."""
    if not pattern.startswith("v2 "):
        return pattern_plan(pattern, layout, heads, device="cpu")
    from rf_compile.config import RainFusionConfig
    from rf_compile.ops.attention import v2_plan

    sparsity, order = pattern[len("v2 s="):].split()
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, layout.seq_len, head_dim, generator=generator) for _ in range(2))
    return v2_plan(q, k, layout, RainFusionConfig(mode="v2", sparsity=float(sparsity), order=order), None)


def pattern_stats(model: str, pattern: str, masked_cost: float, shape: tuple | None = None,
                  program_fixed: float = 1.0, slots: int | None = None) -> dict:
    """Block counts of one (shape, pattern) over every head, as the kernel visits them, and its simulated tails.

    ``shape``: (heads, head_dim, layout), default ``SHAPES[model]``; ``slots``: default ``SLOTS[head_dim]``.
    """
    heads, head_dim, layout = shape or SHAPES[model]
    table, variant_of_head = plan_of(pattern, layout, heads, head_dim)
    extras = plan_extras(table)
    rows = variant_of_head.flatten().long()
    visited = int(extras["kv_num_blocks"][rows].sum())
    masked = int(extras["num_masked"][rows].sum())
    q_blocks, k_blocks = table.kv_indices.shape[1:]
    share = masked / visited
    cost = (visited - masked) + masked * masked_cost  # in unmasked-block units
    blocks = extras["kv_num_blocks"][rows].tolist()  # [heads][query block]
    tails = {f"tail_{name}": launch_tail([blocks[bh][m] + program_fixed
                                          for bh, m in start_order(extras, len(rows), name)],
                                         slots or SLOTS[head_dim]) for name in SCHEDULES}
    return {
        **tails,
        "model": model, "pattern": pattern, "heads": heads, "head_dim": head_dim, "layout": layout.describe(),
        "block_density": visited / (len(rows) * q_blocks * k_blocks), "visited_blocks": visited,
        "masked_share": share, "masked_cost": masked_cost, "free_mask_saving": 1 - visited / cost,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--masked-cost", type=float, default=1.9, help="masked / unmasked block time (default 1.9)")
    parser.add_argument("--program-fixed", type=float, default=1.0,
                        help="a program's fixed time in its key blocks' units, for the tails (default 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    parser.add_argument("--v2", nargs="*", type=float, default=[0.8],
                        help="also RainFusion 2.0's plans at these sparsities, both block orders (default 0.8)")
    args = parser.parse_args()
    patterns = [*args.patterns, *(f"v2 s={s} {order}" for s in args.v2 for order in ORDERS)]
    records = [pattern_stats(m, p, args.masked_cost, program_fixed=args.program_fixed)
               for m in args.models for p in patterns]
    columns = ["model", "pattern", "layout", "block_density", "masked_share", "free_mask_saving",
               *(f"tail_{name}" for name in SCHEDULES)]
    table = markdown_table(records, columns)
    markdown = (
        "# Masked key blocks per benchmark pattern (from the plans, no GPU)\n\n"
        f"Command: `{environment()['command']}`\n\n"
        f"`free_mask_saving`: the share of kernel time a free element mask would save if a masked block costs "
        f"{args.masked_cost}x an unmasked one. `tail_<schedule>`: how much longer than perfectly even work the "
        f"kernel runs with programs started in that order (H100 slots, {args.program_fixed} fixed block a "
        f"program).\n\n{table}\n"
    )
    write_results(args.out, "plan_stats", environment(), records, markdown)
    print(table)


if __name__ == "__main__":
    main()
