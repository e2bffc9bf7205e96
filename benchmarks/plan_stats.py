"""Where the kernel's time can go, from the plans alone (CPU): how many key blocks need the element mask.

For each benchmark shape and head pattern of ``attention.py``: the block density, the share of
visited key blocks that take the masked loop (partial band blocks, text/video edges, the ragged
last block), and the most that making the mask free could save, if a masked block costs
``--masked-cost`` unmasked ones (H100: ``loop="masked"`` ran 1.5-1.9x slower than unmasked blocks,
``benchmarks/results/nvidia-h100-80gb-hbm3/NOTES.md``). It answers whether cheaper masks can close
the gap between the kernel's efficiency and the Triton ceiling (issue 15) before a GPU run is spent.

    python benchmarks/plan_stats.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.attention import PATTERNS, SHAPES, pattern_plan  # noqa: E402
from benchmarks.utils import environment, markdown_table, write_results  # noqa: E402
from rf_compile.kernels.block_sparse import plan_extras  # noqa: E402


def pattern_stats(model: str, pattern: str, masked_cost: float, shape: tuple | None = None) -> dict:
    """Block counts of one (shape, pattern) over every head, as the kernel visits them.

    ``shape``: (heads, head_dim, layout), default ``SHAPES[model]``.
    """
    heads, head_dim, layout = shape or SHAPES[model]
    table, variant_of_head = pattern_plan(pattern, layout, heads, device="cpu")
    extras = plan_extras(table)
    rows = variant_of_head.flatten().long()
    visited = int(extras["kv_num_blocks"][rows].sum())
    masked = int(extras["num_masked"][rows].sum())
    q_blocks, k_blocks = table.kv_indices.shape[1:]
    share = masked / visited
    cost = (visited - masked) + masked * masked_cost  # in unmasked-block units
    return {
        "model": model, "pattern": pattern, "heads": heads, "head_dim": head_dim, "layout": layout.describe(),
        "block_density": visited / (len(rows) * q_blocks * k_blocks), "visited_blocks": visited,
        "masked_share": share, "masked_cost": masked_cost, "free_mask_saving": 1 - visited / cost,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--masked-cost", type=float, default=1.9, help="masked / unmasked block time (default 1.9)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    args = parser.parse_args()
    records = [pattern_stats(m, p, args.masked_cost) for m in args.models for p in args.patterns]
    columns = ["model", "pattern", "layout", "block_density", "masked_share", "free_mask_saving"]
    table = markdown_table(records, columns)
    markdown = (
        "# Masked key blocks per benchmark pattern (from the plans, no GPU)\n\n"
        f"Command: `{environment()['command']}`\n\n"
        f"`free_mask_saving`: the share of kernel time a free element mask would save if a masked block costs "
        f"{args.masked_cost}x an unmasked one.\n\n{table}\n"
    )
    write_results(args.out, "plan_stats", environment(), records, markdown)
    print(table)


if __name__ == "__main__":
    main()
