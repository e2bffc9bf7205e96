"""Would a sparse ring attention pay? What RainFusion v1 plans let a ring skip, measured on CPU.

Ring attention (context parallelism ``ring_degree = cp``) gives rank ``i`` a contiguous shard of the
sequence; K/V shards rotate, and each of the ``cp x cp`` (query shard, key shard) pairs is one ring
step. A sparse ring could skip a step (its K/V transfer and its compute) when no query of shard ``i``
needs a key of shard ``j``. One ring step carries the K/V of every head, so with a mix of head
patterns a step is skipped only if no head needs it. Blocks are the kernel's 128 x 128 tiles of each
variant's plan (``build_plan_table``), in the variant's own token order; a block is counted for every
shard its tokens come from (an optimistic bound: a ring kernel would also have to gather permuted
blocks across shards). Per model layout and ``cp``:

- ``skip_pairs_<pattern>``: share of ring steps that a head of that pattern never needs;
- ``skip_pairs_mix``: share of ring steps that no head needs (spatial, temporal and textural heads
  all present: the v1 mix);
- ``plan_skip_<pattern>``: blocks the plan skips, what Ulysses + RainFusion already saves. A step
  that a sparse ring skips holds only blocks that the plans skip, so the ring saves no compute beyond
  Ulysses + RainFusion; it could save K/V transfers, ``skip_pairs_mix`` of them.

    python benchmarks/ring_skip.py            # writes benchmarks/results/cpu/ring_skip.{md,json}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from utils import environment, markdown_table, write_results

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.plan import PlanTable, build_plan_table, variants_for

LAYOUTS = {
    "Wan2.1 480p 81f": VideoLayout(21, 30, 52),
    "HunyuanVideo 720p 129f": VideoLayout(33, 45, 80, suffix=256),
    "CogVideoX-5B": VideoLayout(13, 30, 45, prefix=226),
}
CP_DEGREES = (2, 4, 8)


def shards_of_blocks(order: torch.Tensor, block: int, cp: int, seq_len: int) -> torch.Tensor:
    """Bool [blocks, cp]: which contiguous shards the tokens of each block of ``order`` come from."""
    shard = torch.div(order.long() * cp, seq_len, rounding_mode="floor")
    blocks = -(-len(order) // block)
    padded = torch.full((blocks * block,), -1, dtype=torch.long)
    padded[: len(order)] = shard
    rows = padded.view(blocks, block)
    return torch.stack([(rows == s).any(-1) for s in range(cp)], dim=-1)


def needed_pairs(table: PlanTable, variant: int, cp: int) -> torch.Tensor:
    """Bool [cp, cp]: (query shard, key shard) pairs that a head of ``variant`` needs."""
    N = table.layout.seq_len
    live = table.to_dense()[variant].float()  # [Mq, Mk]
    q_shards = shards_of_blocks(table.orders[table.q_order[variant]], table.block_m, cp, N).float()
    k_shards = shards_of_blocks(table.orders[table.kv_order[variant]], table.block_n, cp, N).float()
    return (q_shards.t() @ live @ k_shards) > 0


def measure(name: str, layout: VideoLayout, cp: int, config: RainFusionConfig) -> dict:
    variants = variants_for(config)
    table = build_plan_table(layout, variants)
    density = table.density()
    record: dict = {"model": name, "layout": layout.describe(), "tokens": layout.seq_len, "cp": cp}
    needed_any = torch.zeros(cp, cp, dtype=torch.bool)
    for p, variant in enumerate(variants):
        pattern = variant.pattern.name.lower()
        needed = needed_pairs(table, p, cp)
        needed_any |= needed
        record[f"skip_pairs_{pattern}"] = 1.0 - needed.float().mean().item()
        record[f"plan_skip_{pattern}"] = 1.0 - density[p].item()
    record["skip_pairs_mix"] = 1.0 - needed_any.float().mean().item()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
    args = parser.parse_args()
    config = RainFusionConfig()  # v1 defaults: bandwidth 0.25, stride 2
    records = [measure(name, layout, cp, config) for name, layout in LAYOUTS.items() for cp in CP_DEGREES]
    columns = [
        "model", "layout", "cp", "skip_pairs_spatial", "skip_pairs_temporal", "skip_pairs_textural",
        "skip_pairs_mix", "plan_skip_spatial", "plan_skip_temporal", "plan_skip_textural",
    ]  # fmt: skip
    table = markdown_table(records, columns)
    markdown = (
        "# Sparse ring attention: what RainFusion v1 plans let a ring skip\n\n"
        f"`python benchmarks/ring_skip.py` (CPU, plan tables only). v1 defaults: bandwidth {config.bandwidth}, "
        f"stride {config.stride}, 128x128 blocks. The sequence is cut into `cp` contiguous shards (ring "
        "attention); `skip_pairs_*`: share of (query shard, key shard) ring steps a head of that pattern never "
        "needs, `_mix`: that no head needs; `plan_skip_*`: blocks each plan skips (Ulysses + RainFusion "
        "already skips them). A skipped ring step holds only blocks the plans skip: a sparse ring saves no "
        "compute beyond Ulysses + RainFusion, at most the K/V transfers of `skip_pairs_mix`.\n\n"
        f"{table}\n"
    )
    write_results(args.out, "ring_skip", environment(), records, markdown)
    print(table)


if __name__ == "__main__":
    main()
