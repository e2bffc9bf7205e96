"""Where a compiled step's time goes: torch.profiler over the steps of each variant at one length, side by side.

For gaps that step timings alone cannot explain, such as ``crossover.py``'s Wan2.1-1.3B heads at 6,912 tokens in
a symbolic graph (0.950x inductor while rainfusion's op kept every site dense). The model and its compilation
are ``crossover.py``'s: a few blocks of a published model's preset, regional compilation, one compile per variant
through every ``--tokens`` length in turn (Dynamo's automatic dynamic shapes make the graphs after the first
length symbolic). At the last length each variant runs ``--steps`` profiled calls after two untimed ones. Per
variant, a step's:

- ``wall_ms``: host time of the call with the device synchronised at both ends;
- ``busy_ms``: device time covered by some kernel; ``span_ms``: first kernel's start to the last one's end;
  ``idle_ms``: span minus busy (launch gaps: the host was late), ``lead_ms``: call start to first kernel;
- ``op_cpu_ms``: host time inside ``rainfusion::attention`` (0 for inductor); ``sdpa_cpu_ms``: host time inside
  SDPA's backend ops (cuDNN, flash, ...), whoever calls them; ``sdpa``: the attention kernels' names;
- ``syncs``: host waits for the device inside the call (``torch.cuda.set_sync_debug_mode``), with their messages;
- kernels by device time, and the kernel names whose time differs most between the variants.

Writes ``<name>.json`` and ``<name>.md`` under ``benchmarks/results/<gpu>/``.

    python benchmarks/profile_step.py                       # Wan2.1-1.3B heads, 1,024 -> 3,120 -> 6,912 tokens
    python benchmarks/profile_step.py --shape cogvideox --tokens 6912
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from crossover import GRIDS, VARIANTS, presets_at, time_steps
from e2e import MODELS, _call, _compiled, _log
from utils import environment, gpu_slug, markdown_table, write_results

ATTENTION_WORDS = ("flash", "fmha", "attention", "attn", "sdpa", "cudnn")
# The backend ops SDPA dispatches to (cuDNN, flash, efficient, CPU flash), called by inductor's graph directly and
# by the op through F.scaled_dot_product_attention: their host time compares across the variants. (The kernels
# they call in turn, such as aten::_flash_attention_forward, would count twice.)
SDPA_BACKEND_OPS = "aten::_scaled_dot_product_"


def intervals_union(spans: list[tuple[float, float]]) -> float:
    """Total length covered by half-open intervals (start, end)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def profile_steps(model, preset, t: torch.Tensor, steps: int) -> dict:
    """Profile ``steps`` calls (after two untimed ones) and reduce them to per-step numbers."""
    from torch.autograd import DeviceType

    latent = preset.args[0]
    for _ in range(2):
        _call(model, preset, latent, t)
    torch.cuda.synchronize()
    walls, syncs = [], []
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.profiler.record_function(f"step{i}"), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")  # each host wait inside the call becomes a warning
                try:
                    _call(model, preset, latent, t)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
            syncs += [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
                      if "synchroniz" in str(w.message)]  # fmt: skip
            walls.append((time.perf_counter() - start) * 1e3)
    events = prof.events()
    marks = {e.name: e.time_range for e in events if e.name.startswith("step") and e.device_type == DeviceType.CPU}
    # Device events: kernels, copies and fills; the record_function marks also appear there, as annotations.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in marks]
    per_step = []
    for i in range(steps):
        mark = marks[f"step{i}"]
        inside = [k for k in kernels if mark.start <= k.time_range.start <= mark.end]
        spans = [(k.time_range.start, k.time_range.end) for k in inside]
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        busy = intervals_union(spans)
        per_step.append({"busy": busy, "span": last - first, "lead": first - mark.start})
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for k in kernels:
        by_kernel[k.name][0] += 1
        by_kernel[k.name][1] += k.time_range.elapsed_us()
    host = lambda names: sum(e.time_range.elapsed_us() for e in events  # noqa: E731
                             if e.device_type == DeviceType.CPU and e.name.startswith(names))  # fmt: skip
    op_cpu = host("rainfusion::attention")
    sdpa_cpu = host(SDPA_BACKEND_OPS)
    median = lambda key: statistics.median(s[key] for s in per_step) / 1e3  # noqa: E731
    busy, span = median("busy"), median("span")
    return {
        "wall_ms": statistics.median(walls), "busy_ms": busy, "span_ms": span, "idle_ms": span - busy,
        "lead_ms": median("lead"), "op_cpu_ms": op_cpu / steps / 1e3, "sdpa_cpu_ms": sdpa_cpu / steps / 1e3,
        "syncs": len(syncs) / steps,
        "sync_messages": sorted(set(syncs))[:5],
        "sdpa": sorted({name for name in by_kernel if any(w in name.lower() for w in ATTENTION_WORDS)}),
        "kernels": {name: {"calls": c / steps, "us": us / steps} for name, (c, us) in by_kernel.items()},
    }  # fmt: skip


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    model_spec = MODELS[args.shape]
    presets = presets_at(args.shape, args.tokens, args.layers, "cuda", torch.bfloat16)
    model = next(iter(presets.values())).model
    regional = tuple(getattr(model, "_repeated_blocks", None) or model_spec.blocks)
    t = model_spec.schedule(50, next(iter(presets.values())).args[0].dtype)[0]
    records = []
    for name in args.variants:
        torch._dynamo.reset()
        with _compiled(model, VARIANTS[name], "default", 50, regional, {}) as compiled, torch.no_grad():
            for n, preset in presets.items():
                steps = time_steps(compiled, preset, t, 0.1)
                _log(f"{name} {n:,} tokens: {statistics.median(steps):.2f} ms a step")
            found = profile_steps(compiled, preset, t, args.steps)
        (layout,) = preset.expected_layouts
        records.append({"model": model_spec.name, "layers": args.layers, "video_tokens": n,
                        "seq_len": layout.seq_len, "variant": name, **found})  # fmt: skip
        _log(f"{name}: wall {found['wall_ms']:.3f} ms, busy {found['busy_ms']:.3f} ms, idle {found['idle_ms']:.3f} ms")
    return records, kernel_differences(records)


def kernel_differences(records: list[dict], rows: int = 15) -> list[dict]:
    """The kernel names whose device time a step differs most between the first variant and each other."""
    base, rest = records[0], records[1:]
    names = set(base["kernels"]).union(*(r["kernels"] for r in rest))
    us = lambda r, name: r["kernels"].get(name, {}).get("us", 0.0)  # noqa: E731
    calls = lambda r, name: r["kernels"].get(name, {}).get("calls", 0.0)  # noqa: E731
    table = []
    for name in sorted(names, key=lambda n: -max(abs(us(r, n) - us(base, n)) for r in rest))[:rows]:
        row = {"kernel": name[:90]}
        for r in records:
            row[f"{r['variant']}_us"], row[f"{r['variant']}_calls"] = us(r, name), calls(r, name)
        table.append(row)
    return table


def write(records: list[dict], differences: list[dict], env: dict, out_dir: Path, stem: str) -> None:
    columns = ["model", "video_tokens", "seq_len", "variant", "wall_ms", "busy_ms", "span_ms", "idle_ms", "lead_ms",
               "op_cpu_ms", "sdpa_cpu_ms", "syncs"]  # fmt: skip
    summary = markdown_table(records, columns)
    sdpa = "\n".join(f"- {r['variant']}: {', '.join(r['sdpa']) or 'none'}" for r in records)
    waits = "\n".join(f"- {r['variant']}: {m}" for r in records for m in r["sync_messages"]) or "none"
    diff = markdown_table(differences, list(differences[0])) if differences else ""
    markdown = (
        f"# Where a compiled step's time goes\n\nenv: {env}\n\nPer step (median of the profiled calls): wall, "
        "device busy, first-to-last kernel span, idle inside the span, call start to first kernel, host time in "
        f"rainfusion's op and in SDPA's backend ops, host waits for the device.\n\n{summary}\n\n"
        f"Attention kernels:\n{sdpa}\n\n"
        f"Host waits (where):\n{waits}\n\nKernels whose device time a step differs "
        f"most (us a step, calls a step):\n\n{diff}\n"
    )
    for r in records:  # the per-kernel breakdown stays in the JSON; the markdown has the comparison
        r["kernels"] = dict(sorted(r["kernels"].items(), key=lambda kv: -kv[1]["us"]))
    write_results(out_dir, stem, env, records + [{"differences": differences}], markdown)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wan1.3b", choices=list(MODELS), help="e2e.py model key (default wan1.3b)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 3120, 6912], choices=list(GRIDS),
                        help="lengths compiled in turn; the last is profiled (default: 1024 3120 6912)")
    parser.add_argument("--variants", nargs="+", default=["inductor", "rf"], choices=list(VARIANTS),
                        help="the first is the comparison's base (default: inductor rf)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="profiled calls (default 5)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--name", default="profile_step", help="file stem (default profile_step)")
    args = parser.parse_args()
    if len(args.variants) < 2 or args.steps < 1:
        parser.error("give two variants or more and --steps of 1 or more")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py profiles device kernels: it needs a CUDA GPU")
    env = environment()
    records, differences = run(args)
    write(records, differences, env, args.out or Path(__file__).parent / "results" / gpu_slug(env["gpu"]), args.name)


if __name__ == "__main__":
    main()
