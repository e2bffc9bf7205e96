"""A site's device counters -> its host-side statistics (the numbers ``stats()`` reports).

Reading the counters synchronises with the device: only ``stats()`` calls this, between steps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rf_compile.ops.runtime.shapes import ShapeState
from rf_compile.plan import Pattern


def summarize(shapes: Iterable[ShapeState]) -> tuple[dict, dict[str, dict]]:
    """The statistics over all ``shapes`` of one site, and per layout (keyed by its description)."""
    per_layout: dict[str, dict] = {}
    total: dict | None = None
    for shape in shapes:
        _accumulate(per_layout.setdefault(shape.layout.describe(), _empty_summary(shape)), shape)
        total = total or _empty_summary(shape)  # every shape of a site has its heads and variants
        _accumulate(total, shape)
    by_layout = {name: _finish(entry) for name, entry in per_layout.items()}
    return (_finish(total) if total is not None else _finish_empty()), by_layout


def _empty_summary(shape: ShapeState) -> dict:
    P, H = len(shape.variants), shape.heads
    return {
        "variants": shape.variants,
        "calls": 0,
        "dense_calls": 0,
        "arm_runs": 0,
        "counts": torch.zeros(H, P, dtype=torch.int64),
        "recall": torch.zeros(H, 2, dtype=torch.float64),
        "kept": 0.0,
        "blocks": torch.zeros(H, dtype=torch.float64),
        "sparse_heads": 0.0,
    }


def _accumulate(entry: dict, shape: ShapeState) -> None:
    entry["calls"] += int(shape.calls)
    entry["dense_calls"] += int(shape.dense_calls)
    entry["arm_runs"] += int(shape.arm_runs)
    entry["counts"] += shape.variant_counts.cpu()
    entry["recall"] += shape.recall_sums.cpu()
    entry["kept"] += float(shape.kept)
    entry["blocks"] += shape.block_density_sums.cpu()
    entry["sparse_heads"] += float(shape.sparse_heads)


def _finish(entry: dict) -> dict:
    """Counters of one layout -> the public summary fields."""
    variants, counts = entry["variants"], entry["counts"]
    heads = []
    if entry["variants"] and counts.sum() > 0:
        recall_sum, recall_count = entry["recall"].unbind(-1)
        for h, row in enumerate(counts.tolist()):
            per_pattern = {p.name.lower(): 0 for p in Pattern if p != Pattern.DENSE}
            bandwidths = []
            for variant, n in zip(variants, row):
                if variant.pattern == Pattern.DENSE:
                    continue
                per_pattern[variant.pattern.name.lower()] += n
                if variant.pattern != Pattern.TEXTURAL:
                    bandwidths += [variant.bandwidth] * n
            heads.append(
                {
                    **per_pattern,
                    "mean_bandwidth": sum(bandwidths) / len(bandwidths) if bandwidths else None,
                    "mean_recall": float(recall_sum[h] / recall_count[h]) if recall_count[h] else None,
                }
            )
    elif entry["blocks"].sum() > 0:
        calls_per_head = entry["sparse_heads"] / len(entry["blocks"])
        heads = [{"block_density": d / calls_per_head} for d in entry["blocks"].tolist()]
    density = entry["kept"] / entry["sparse_heads"] if entry["sparse_heads"] else None
    return {
        "calls": entry["calls"],
        "dense_calls": entry["dense_calls"],
        "sparse_calls": entry["calls"] - entry["dense_calls"],
        "arm_runs": entry["arm_runs"],
        "density": density,
        "sparsity": None if density is None else 1.0 - density,
        "heads": heads,
    }


def _finish_empty() -> dict:
    return {"calls": 0, "dense_calls": 0, "sparse_calls": 0, "arm_runs": 0, "density": None, "sparsity": None,
            "heads": []}  # fmt: skip
