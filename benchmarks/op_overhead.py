"""What the op does around its kernels, per call: the small device ops it issues and its host time, on the CPU.

A sparse call of ``rainfusion::attention`` runs, besides the attention kernel, a step clock, the call's decisions
(dense step? ARM run? ramp progress), v2's prediction or v1's ARM, the kernel's per-table tensors and the stats.
On a GPU each of those small ops is a launch (host time) and a kernel of a few microseconds (device time), so
their count is what a call pays before its attention. This counts them by the function that issues them
(``TorchDispatchMode``) and times the whole call on the host, for v1's and v2's defaults in their sparse phase
(the CPU path is never priced by the cost model, so no dense verdict there). The attention itself is left out:
``run_plan`` is replaced by what the Triton path does before its launch (``plan_extras``). On the CPU the
selection and the ARM are PyTorch paths (``topk``, ``sort`` ...) where CUDA runs a few Triton kernels: their
stage is listed apart.

A further record times a call that stays dense (its shape judged so before) through the dispatcher, as a compiled
graph makes it, against the SDPA call and the output copy it wraps: what the op's registration and lookups cost
every call of every site. With ``--graph``, a last one compiles a small attention block three times (inductor;
rainfusion with ``mode="dense"``; the same without the step count's forward pre-hook) and times whole calls in
turns: what the op and the hook add to a compiled step over inductor's own SDPA call.

Writes ``<name>.json`` and ``<name>.md`` under ``--out`` (default ``benchmarks/results/cpu``).

    python benchmarks/op_overhead.py
    python benchmarks/op_overhead.py --name op_overhead_before --calls 400
    python benchmarks/op_overhead.py --graph --calls 2000
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.utils import environment, markdown_table, write_results  # noqa: E402
from rf_compile.config import RainFusionConfig  # noqa: E402
from rf_compile.layout import VideoLayout  # noqa: E402
from rf_compile.ops import attention as op  # noqa: E402
from rf_compile.ops.runtime.models import site_state  # noqa: E402
from rf_compile.ops.runtime.sites import get_spec, register_site  # noqa: E402
from rf_compile.ops.runtime.stats import reset  # noqa: E402

# Ops that make no kernel on a GPU (views, metadata, allocation), by name.
NO_KERNEL = {"view", "slice", "select", "unsqueeze", "squeeze", "transpose", "reshape", "_reshape_alias", "expand",
             "alias", "detach", "empty", "empty_like", "empty_strided", "new_empty", "permute", "_unsafe_view", "t",
             "lift_fresh", "as_strided"}
SPARSE = {"dense_warmup": 0.0, "cost_model": False}
MODES = {
    "v1 (default)": RainFusionConfig(**SPARSE),
    "v2 (default)": RainFusionConfig(mode="v2", **SPARSE),
}
# Where an op comes from -> the stage it is reported under: functions that own every op under them, and functions
# that own only the ops they issue themselves (they call into other stages).
ENCLOSING = {"tick": "step clock", "begin": "call decisions", "plan_extras": "kernel tables",
             "_ragged_last_kept": "kernel tables", "concat_plans": "v1 non-local plans", "_record": "stats"}
OWN = {"_predict": "v2 budget", "ramp_densities": "v2 budget", "nonlocal_blocks": "v1 non-local plans"}

class OpCounter(TorchDispatchMode):
    """Counts the ops that make a kernel, by the stage of the rf_compile function that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_KERNEL:
            self.stages[_stage([f for f in traceback.extract_stack() if "rf_compile" in f.filename])] += 1
        return func(*args, **(kwargs or {}))


def _stage(frames) -> str:
    """The stage of an op from the rf_compile frames that issue it, innermost last (``ENCLOSING``, ``OWN``),
    else the prediction's or the ARM's modules, else the op's own body."""
    for frame in reversed(frames):
        if frame.name in ENCLOSING:
            return ENCLOSING[frame.name]
    if frames and frames[-1].name in OWN:
        return OWN[frames[-1].name]
    if any(f.filename.endswith(("ops/v2.py", "ops/arm.py", "kernels/arm.py", "shared_budget.py")) for f in frames):
        return "prediction / ARM"
    return "op body"


def kernel_tables_only(q, k, v, table, variant_of_head, attn_mask, scale, kernel, out=None, precision="bf16"):
    """``run_plan`` without the attention: what the Triton path computes before its launch."""
    from rf_compile.kernels.block_sparse import plan_extras

    plan_extras(table)
    variant_of_head.int()
    return out


def one_mode(name: str, config: RainFusionConfig, args) -> dict:
    layout = VideoLayout(*args.grid, prefix=args.text)
    key = register_site(f"overhead.{name}", layout, config)
    q, k, v = (torch.randn(args.batch, args.heads, layout.seq_len, args.head_dim) for _ in range(3))
    timestep = torch.full((args.batch,), 500.0)

    def call(step: int) -> None:
        op._attention(q, k, v, None, None, timestep - step, None, None, key, [])

    for step in range(3):  # the shape's first call builds its state
        call(step)
    counter = OpCounter()
    with counter:
        call(3)
    steps = iter(range(4, 4 + 10 + args.calls))
    host_us = _median_us(lambda: call(next(steps)), args.calls)
    stages = dict(sorted(counter.stages.items(), key=lambda item: -item[1]))
    return {"mode": name, "ops": sum(stages.values()), "host_us": host_us, "stages": stages,
            "layout": layout.describe(), "shape": [args.batch, args.heads, layout.seq_len, args.head_dim]}


def dense_call(args) -> dict:
    """Host time of a dense-verdict call through ``torch.ops.rainfusion.attention`` (no_grad, as pipelines run)
    against what it runs: SDPA and the copy into the op's output layout. A tiny shape (1 x 1 x 4 x 8), so that
    the difference is the op's own cost rather than the CPU's attention."""
    layout = VideoLayout(1, 2, 2)
    key = register_site("overhead.dense", layout, RainFusionConfig())
    q, k, v = (torch.randn(1, 1, layout.seq_len, 8) for _ in range(3))
    reason = "benchmark: a shape judged dense"
    get_spec(key).remember_dense(((), q.shape, k.shape, v.shape, q.dtype, q.device, None), reason)  # the op's key

    def through_op() -> None:
        torch.ops.rainfusion.attention.default(q, k, v, None, None, None, None, None, key, [])

    def sdpa_alone() -> None:
        op.output_like(q).copy_(F.scaled_dot_product_attention(q, k, v))

    with torch.no_grad():
        op_us, sdpa_us = _median_us(through_op, args.calls), _median_us(sdpa_alone, args.calls)
    if site_state(get_spec(key), None).dense_reasons.get(reason, 0) < args.calls:
        raise RuntimeError("the op did not take the remembered dense verdict: its shape key changed, update this one")
    return {"mode": "dense verdict, through the dispatcher", "ops": 0, "host_us": op_us, "sdpa_us": sdpa_us,
            "overhead_us": op_us - sdpa_us, "stages": {}, "layout": layout.describe(), "shape": list(q.shape)}


def _median_us(fn, calls: int) -> float:
    """Median host time of ``fn`` in microseconds over ``calls`` calls, after ten untimed ones."""
    return _in_turns({"fn": fn}, calls)["fn"]


def _in_turns(fns: dict, calls: int) -> dict[str, float]:
    """Median host time in microseconds of each of ``fns``, one call of each per round (drift falls on all)."""
    for _ in range(10):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


class _Block(torch.nn.Module):
    """A projection, self-attention over a small video and a projection: the graph a compiled step wraps."""

    def __init__(self, layout: VideoLayout, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.layout, self.heads = layout, heads
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def graph_calls(args) -> dict:
    """Host time of a compiled block's call: inductor, rainfusion in ``mode="dense"`` (the op computes SDPA), and
    rainfusion without the step count's forward pre-hook, in turns."""
    layout = VideoLayout(2, 4, 4)
    options = {"layout": layout, "min_video_tokens": 0, "mode": "dense"}
    x = torch.randn(1, layout.seq_len, 32)
    models = {"inductor": torch.compile(_Block(layout), backend="inductor"),
              "rainfusion": torch.compile(_Block(layout), backend="rainfusion", options=options),
              "rainfusion, no pre-hook": torch.compile(_Block(layout), backend="rainfusion", options=options)}
    with torch.no_grad():
        for model in models.values():
            model(x)  # compiles; rainfusion's first call registers the pre-hook
        models["rainfusion, no pre-hook"]._orig_mod._forward_pre_hooks.clear()
        us = _in_turns({name: functools.partial(model, x) for name, model in models.items()}, args.calls)
    return {"mode": "compiled block, in turns", "ops": 0, "host_us": us["rainfusion"], "stages": {}, "calls_us": us,
            "op_us": us["rainfusion, no pre-hook"] - us["inductor"],
            "hook_us": us["rainfusion"] - us["rainfusion, no pre-hook"], "layout": layout.describe(),
            "shape": [1, 2, layout.seq_len, 16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", nargs=3, type=int, default=[3, 16, 24], metavar=("F", "H", "W"),
                        help="latent frames, height, width (default 3 16 24: 1,152 video tokens)")
    parser.add_argument("--text", type=int, default=0, help="text tokens before the video (default 0)")
    parser.add_argument("--batch", type=int, default=2, help="batch (default 2: CFG)")
    parser.add_argument("--heads", type=int, default=4, help="heads (default 4)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per mode (default 200)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
    parser.add_argument("--name", default="op_overhead", help="file stem (default op_overhead)")
    parser.add_argument("--graph", action="store_true",
                        help="also time a compiled block's call against inductor's (compiles three times)")
    args = parser.parse_args()
    torch.manual_seed(0)
    op.run_plan = kernel_tables_only
    reset()
    records = [one_mode(name, config, args) for name, config in MODES.items()]
    for record in records:
        print(f"{record['mode']}: {record['ops']} ops, {record['host_us']:.0f} us a call; {record['stages']}")
    dense = dense_call(args)
    print(f"{dense['mode']}: {dense['host_us']:.1f} us a call, SDPA and copy alone {dense['sdpa_us']:.1f} us")
    graph = graph_calls(args) if args.graph else None
    if graph:
        print(f"{graph['mode']}: {graph['calls_us']}")
    stage_names = sorted({s for r in records for s in r["stages"]})
    rows = [{"mode": r["mode"], "ops": r["ops"], "host_us": round(r["host_us"]),
             **{s: r["stages"].get(s, "") for s in stage_names}} for r in records]
    env = environment()
    markdown = (f"# What the op does around its kernels, per call (CPU)\n\nenv: {env}\n\n"
                f"{records[0]['shape']} (B, H, N, D), layout {records[0]['layout']}, fp32 on the CPU. `ops`: ops that "
                "make a kernel on a GPU, by the stage that issues them; `host_us`: median host time of a call without "
                "the attention (the Triton path's per-table work instead), over "
                f"{args.calls} calls. v2's `prediction / ARM` is the CPU's PyTorch selection (CUDA: three kernels).\n\n"
                + markdown_table(rows, ["mode", "ops", "host_us", *stage_names])
                + f"\n\nA call that stays dense (shape judged before; {dense['shape']}), through the dispatcher "
                f"under no_grad: {dense['host_us']:.1f} us a call, of which SDPA and the copy into the op's output "
                f"layout {dense['sdpa_us']:.1f} us: **{dense['overhead_us']:.1f} us** the op's own (median of "
                f"{args.calls}).\n")
    if graph:
        markdown += (f"\nA compiled block ({graph['shape']}, one attention site), whole calls in turns over "
                     f"{args.calls} rounds: inductor {graph['calls_us']['inductor']:.1f} us, rainfusion "
                     f"(`mode=\"dense\"`) {graph['host_us']:.1f} us: the op **{graph['op_us']:.1f} us** over "
                     f"inductor's own SDPA call, the step count's pre-hook **{graph['hook_us']:.1f} us** a forward.\n")
    write_results(args.out, args.name, env, [*records, dense, *([graph] if graph else [])], markdown)


if __name__ == "__main__":
    main()
