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
        "errors": torch.zeros(H, 2, dtype=torch.float64),
        "candidates": torch.zeros(shape.candidate_errors.shape, dtype=torch.float64),
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
    entry["errors"] += shape.error_sums.cpu()
    entry["candidates"] += shape.candidate_errors.cpu()
    entry["sparse_heads"] += float(shape.sparse_heads)


def _finish(entry: dict) -> dict:
    """Counters of one layout -> the public summary fields."""
    variants, counts = entry["variants"], entry["counts"]
    calls_per_head = entry["sparse_heads"] / len(entry["blocks"])
    block_density = [d / calls_per_head if calls_per_head else None for d in entry["blocks"].tolist()]
    error_sum, error_count = entry["errors"].unbind(-1)
    errors = [float(e / n) if n else None for e, n in zip(error_sum, error_count)]
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
                    "block_density": block_density[h],
                    "attn_rel_err": errors[h],
                }
            )
    elif entry["candidates"].numel() and calls_per_head:  # mode="calibrate": each candidate's mean error
        heads = [{"candidate_errors": (row / calls_per_head).tolist()} for row in entry["candidates"]]
    elif entry["blocks"].sum() > 0:
        heads = [{"block_density": d, "attn_rel_err": e} for d, e in zip(block_density, errors)]
    density = entry["kept"] / entry["sparse_heads"] if entry["sparse_heads"] else None
    blocks = float(entry["blocks"].sum()) / entry["sparse_heads"] if entry["sparse_heads"] else None
    error = float(error_sum.sum() / error_count.sum()) if error_count.sum() else None
    return {
        "calls": entry["calls"],
        "dense_calls": entry["dense_calls"],
        "sparse_calls": entry["calls"] - entry["dense_calls"],
        "arm_runs": entry["arm_runs"],
        "density": density,
        "sparsity": None if density is None else 1.0 - density,
        "block_density": blocks,
        "attn_rel_err": error,
        "heads": heads,
    }


def _finish_empty() -> dict:
    return {"calls": 0, "dense_calls": 0, "sparse_calls": 0, "arm_runs": 0, "density": None, "sparsity": None,
            "block_density": None, "attn_rel_err": None, "heads": []}  # fmt: skip
