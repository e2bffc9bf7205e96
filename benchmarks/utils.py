"""Shared helpers of the benchmarks: timing, environment record, result files, row references.

Not a library: only what ``benchmarks/*.py`` share.
"""

from __future__ import annotations

import json
import math
import platform
import re
import sys
from pathlib import Path

import torch

from rf_compile.reference import masks as paper_masks
from rf_compile.reference.attention import masked_attention


def do_bench(fn, warmup_ms: float = 25, rep_ms: float = 200) -> dict[str, float]:
    """Median / p20 / p80 of ``fn`` in ms (CUDA events through triton.testing.do_bench)."""
    import triton.testing

    q20, q50, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return {"ms": q50, "ms_p20": q20, "ms_p80": q80}


def do_bench_graph(fn, rep_ms: float = 100) -> float:
    """Median device time of ``fn`` in ms, replayed from a CUDA graph: no launch gaps, no host overhead.

    For small multi-kernel steps (ARM, v2 prediction) whose wall time is host-bound in isolation but
    overlaps with the previous kernels inside a model.
    """
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def config_name(config) -> str:
    """A block-sparse kernel launch configuration as warps / stages / warp specialisation / key sub-tiles."""
    return (f"w{config.num_warps}/s{config.num_stages}/ws{int(config.kwargs['WARP_SPECIALIZE'])}"
            f"/n{config.kwargs['SPLIT_N']}")  # fmt: skip


def environment() -> dict[str, object]:
    """GPU name, versions and the exact command, for every result file."""
    import triton

    env: dict[str, object] = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(out_dir: Path, stem: str, env: dict, records: list[dict], markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"environment": env, "records": records}, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def reference_rows(q, k, v, table, variant_of_head, rows, *, scale=None, key_bias=None) -> torch.Tensor:
    """Float64 masked attention for the query rows ``rows`` (original positions) of every head.

    The masks come from the paper's definitions (``rf_compile.reference.masks``, one
    [len(rows), N] mask per variant of the v1 ``table``, never N x N), not from the plan itself.
    Returns (B, H, len(rows), D).
    """
    masks = [
        paper_masks.pattern_mask(table.layout, v.pattern, v.bandwidth, v.stride, q.device, rows)
        for v in table.variants
    ]
    mask = torch.stack(masks)[variant_of_head.long()]  # B, H, R, N
    return masked_attention(q[:, :, rows], k, v, mask, scale=scale, key_bias=key_bias)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()
