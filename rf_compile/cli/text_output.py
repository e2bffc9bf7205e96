"""What ``rf-inspect`` prints: the site table, the text summary and the JSON document of an ``Inspection``."""

from __future__ import annotations

import json
from typing import Any

import torch
from tabulate import tabulate

from rf_compile.cli.inspection import Inspection, timesteps
from rf_compile.config import RainFusionConfig

PATTERNS = ("spatial", "temporal", "textural")


def site_summary(stats: dict) -> dict[str, Any]:
    """Pattern shares, mean bandwidth and recall of one site's ``rf_compile.stats()`` entry (v2 heads have no
    patterns: those columns stay empty)."""
    totals = {p: sum(head.get(p, 0) for head in stats["heads"]) for p in PATTERNS}
    chosen = sum(totals.values())
    banded = [(head.get("mean_bandwidth"), head.get("spatial", 0) + head.get("temporal", 0)) for head in stats["heads"]]
    banded_calls = sum(n for b, n in banded if b is not None)
    recalls = [head["mean_recall"] for head in stats["heads"] if head.get("mean_recall") is not None]
    return {
        **{p: totals[p] / chosen if chosen else None for p in PATTERNS},
        "bandwidth": sum(b * n for b, n in banded if b is not None) / banded_calls if banded_calls else None,
        "recall": sum(recalls) / len(recalls) if recalls else None,
        "sparsity": stats["sparsity"],
        "dense_calls": f"{stats['dense_calls']}/{stats['calls']}",
    }


def site_table(result: Inspection, tablefmt: str = "simple") -> str:
    """The site table: the compile report, plus the measured statistics after ``--run``."""
    headers = ["site", "module", "seq", "heads x dim", "layout", "status", "reason", "source"]
    measured = ["spatial", "temporal", "textural", "bandwidth", "recall", "sparsity", "dense calls"]
    rows = []
    for s in result.report.sites:
        cells = s.cells()
        row = [cells[h] for h in headers]
        if result.stats is not None:
            site = result.stats.get(s.name)
            summary = site_summary(site) if site else {}
            row += [_percent(summary.get(p)) for p in ("spatial", "temporal", "textural")]
            row += [_number(summary.get("bandwidth")), _percent(summary.get("recall"))]
            row += [_percent(summary.get("sparsity")), summary.get("dense_calls", "")]
        rows.append(row)
    if result.stats is not None:
        headers += measured
    widths = [None] * 6 + [56] + [None] * (len(headers) - 7)
    return tabulate(rows, headers=headers, tablefmt=tablefmt, maxcolwidths=widths, disable_numparse=True)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def format_text(result: Inspection) -> str:
    """Everything ``rf-inspect`` prints without ``--json``."""
    report = result.report
    nodes = sum(len(graph.gm.graph.nodes) for graph in result.graphs)
    lines = [
        f"{result.target.label}: {len(result.graphs)} graph(s), {nodes} FX nodes, captured in "
        f"{result.capture_seconds:.1f} s",
        f"options: {result.options or '{}'}",
        "",
        site_table(result),
        "",
        f"{len(report.sparse)} sparse, {len(report.dense)} dense attention sites",
    ]
    if len(result.graphs) > 1:
        lines.append(
            f"note: Dynamo broke the model into {len(result.graphs)} graphs; attention outside them is not "
            "rewritten (TORCH_LOGS=graph_breaks shows where)"
        )
    preset = result.target.preset
    if preset is not None:
        expected = preset.self_attention_sites + preset.dense_sites
        lines.append(
            f"expected for this preset: {preset.self_attention_sites} video self-attention, "
            f"{preset.dense_sites} other (dense) sites"
            + (
                f"; {expected - len(report.sites)} missing from the captured graphs"
                if len(report.sites) < expected
                else ""
            )
        )
        if preset.notes:
            lines.append(f"note: {preset.notes}")
    if report.sparse and any(param.is_meta for param in result.target.model.parameters()):
        lines.append(
            "note: captured on the meta device; the kernel in brackets is what kernel='auto' picks off CUDA "
            "(on CUDA it picks triton where the kernel supports the site)"
        )
    models = sorted({entry["model"] for entry in (result.stats or {}).values() if entry.get("model")})
    if models:
        lines.append(f"statistics of model instance {', '.join(models)} (rf_compile.stats() names it so)")
    counts = sorted({(e["warmup_steps"], e["num_steps_from"]) for e in (result.stats or {}).values() if e.get("calls")})
    for warmup, source in counts:
        lines.append(f"dense warm-up: the first {warmup} step(s) of each video ({source})")
    nonlocal_line = _nonlocal_heads(result.options) if report.sparse else None
    if nonlocal_line:
        lines.append(nonlocal_line)
    ramps = sorted({tuple(e["sparsity_range"]) for e in (result.stats or {}).values() if e.get("sparsity_range")})
    for first, last in ramps:
        lines.append(f"sparsity ramp of the predicted blocks: {first:.2f} at the first sparse step -> {last:.2f} at "
                     "the last (option sparsity_ramp)")
    if result.steps and isinstance(result.target.kwargs.get("timestep"), torch.Tensor):
        lines.append(f"after {result.steps} step(s), timesteps {', '.join(f'{t:g}' for t in timesteps(result.steps))}")
    elif result.steps:
        lines.append(
            f"after {result.steps} step(s) of the same inputs: the model has no 'timestep' keyword input, so the "
            "dense warm-up counted calls (option num_steps)"
        )
    return "\n".join(lines)


def _nonlocal_heads(options: dict[str, Any]) -> str | None:
    """What v1 / v1+ compute for the heads counted as textural: the paper's checkerboard or predicted blocks."""
    config = RainFusionConfig.from_options(options)[0]
    if config.mode not in ("v1", "v1+"):
        return None
    if config.predicts_nonlocal:
        return (f"textural heads (neither spatial nor temporal at ARM threshold {config.threshold:g}): predicted "
                f"blocks, {config.nonlocal_density:g} of the key blocks in {config.block_order} order (options "
                "textural, textural_density; the paper's pattern: textural='checkerboard')")
    return f"textural heads: the paper's checkerboard, 1 key in {config.stride} (option textural)"


def to_json(result: Inspection) -> str:
    """The report (``CompileReport.from_json`` reads it back) plus model, options and statistics."""
    data = json.loads(result.report.to_json())
    data.update(
        model=result.target.label,
        options={key: list(v) if isinstance(v, tuple) else v for key, v in result.options.items()},
        graphs=[len(graph.gm.graph.nodes) for graph in result.graphs],
        steps=result.steps,
        stats=result.stats,
    )
    return json.dumps(data, indent=2, default=str)
