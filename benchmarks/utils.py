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

    Builds only a [len(rows), N] mask per variant (never N x N), from the plan semantics of
    ``rf_compile.plan``. Returns (B, H, len(rows), D).
    """
    layout, N, D = table.layout, table.layout.seq_len, q.shape[-1]
    device = q.device
    pos = torch.arange(N, device=device)
    video = (pos >= layout.prefix) & (pos < layout.prefix + layout.video_tokens)
    masks = []
    for p in range(len(table.variants)):
        q_order = table.orders[table.q_order[p]].long()
        kv_order = table.orders[table.kv_order[p]].long()
        inv_q = torch.empty_like(q_order)
        inv_q[q_order] = pos
        i = inv_q[rows]  # positions of the rows in the query order
        band, valid = int(table.band[p]), int(table.kv_valid[p])
        allowed = (pos[None, :] < valid).expand(len(rows), N)
        if band >= 0:
            allowed = allowed & (~video[None, :] | ((i[:, None] - pos[None, :]).abs() <= band))
        allowed = allowed | ~video[i][:, None]
        mask = torch.zeros(len(rows), N, dtype=torch.bool, device=device)
        mask[:, kv_order] = allowed
        masks.append(mask)
    mask = torch.stack(masks)[variant_of_head.long()]  # B, H, R, N
    scale = scale if scale is not None else D**-0.5
    scores = torch.einsum("bhrd,bhnd->bhrn", q[:, :, rows].double() * scale, k.double())
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :].double()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v.double()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()
