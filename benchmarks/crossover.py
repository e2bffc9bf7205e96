"""Where rainfusion's default pays: a sweep of sequence lengths and head shapes, end to end, against inductor.

A few-block transformer of a published model (random weights, CFG batch 2, ``e2e.py``'s presets and calls) at
1k-120k video tokens, for the head shapes of Wan2.1-1.3B (12 x 128) and CogVideoX-5B (48 x 64, 226 text tokens
first) by default, Wan2.1-14B (40 x 128) with ``--shapes wan``. Per head shape every variant compiles the blocks
of its own copy of the model once (the same weights; regional compilation, as ``e2e.py --regional``; Dynamo's
automatic dynamic shapes take the later lengths), then every length runs, the variants in turns:

- ``inductor``: ``backend="inductor"``;
- ``rf``: rainfusion's defaults (v1, the cost model on: shapes where sparse would not pay stay dense);
- ``rf_sparse``: the same with ``cost_model=False``: sparse at every length, to show where it would have lost;
- ``rf_v2`` (only when asked for): RainFusion 2.0 at its default 80% sparsity, the cost model on.

The rainfusion variants use ``dense_warmup=0``: every timed call is a sparse-phase call (the warm-up steps of a
real loop are dense in every variant), and ``sparsity_ramp=0``: the timed calls share one timestep, where a ramp
would keep its first step's blocks; flat is the ramp's mean. Per length: two untimed calls of each variant
(compile, tune), then rounds of one timed call of each variant in turn, for at least 0.3 s of the slowest one's
calls (3-20 rounds), so that drift of the host or of the clocks falls on every variant alike; ``ms_per_step`` is a
variant's median, ``speedup_vs_inductor`` inductor's over it. rainfusion's records also say what its sites did
(``decision``: sparse or dense, with the cost model's reason) and carry the cost model's own estimate
(``est_ratio``, sparse over dense attention). Writes ``crossover.json``, ``.md`` and ``.png`` under
``benchmarks/results/<gpu>/`` after every head shape.

    python benchmarks/crossover.py                         # H200: about 4 minutes (estimated)
    python benchmarks/crossover.py --shapes wan --name crossover_wan14b    # 40 x 128 heads: another ~3 minutes
    python benchmarks/crossover.py --shapes wan1.3b --tokens 1024 6912 32760 --reps-s 0.1   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from e2e import MODELS, _compiled, _log, _timed_call
from utils import environment, gpu_slug, markdown_table, write_results

import rf_compile
from rf_compile.backend import compiled_graphs, reports_since
from rf_compile.config import RainFusionConfig
from rf_compile.ops import cost
from rf_compile.presets import build_preset

# Video token grids (frames, height, width after patching), 1k-120k; 6,912 is issue 23's small model.
GRIDS = {
    1024: (2, 16, 32),
    3120: (2, 30, 52),
    6912: (3, 48, 48),
    14040: (9, 30, 52),
    32760: (21, 30, 52),
    75600: (21, 45, 80),
    120120: (77, 30, 52),
}
SHAPES = ("wan1.3b", "cogvideox")  # e2e.MODELS keys: 12 x 128 and 48 x 64 heads (``wan``: 40 x 128)
# Every timed call is at one timestep, so a sparsity ramp would stay at its first (densest) step: flat, at the
# ramp's mean, as a whole video's sparse steps average.
RF = {"mode": "v1", "dense_warmup": 0.0, "sparsity_ramp": 0}
VARIANTS = {
    "inductor": {"backend": "inductor"},
    "rf": {"backend": "rainfusion", "options": RF},
    "rf_sparse": {"backend": "rainfusion", "options": {**RF, "cost_model": False}},
    "rf_v2": {"backend": "rainfusion", "options": {**RF, "mode": "v2"}},
}
DEFAULT_VARIANTS = ("inductor", "rf", "rf_sparse")


def inputs_at(key: str, tokens: int, layers: int, device: str, dtype: torch.dtype):
    """The preset of ``e2e.MODELS[key]`` at ``tokens`` video tokens (a grid of ``GRIDS``), ``layers`` blocks."""
    frames, height, width = GRIDS[tokens]
    spec = MODELS[key]
    return build_preset(spec.preset, "full", batch=spec.batch, device=device, dtype=dtype, layers=layers,
                        latent=(frames, 2 * height, 2 * width))  # fmt: skip


def time_steps(model, preset, t: torch.Tensor, reps_s: float) -> list[float]:
    """ms of each timed call: two untimed calls first, then at least ``reps_s`` seconds of calls (3-20)."""
    return time_in_turns({"model": functools.partial(_timed_ms, model, preset, t)}, reps_s)["model"]


def time_in_turns(calls: dict[str, Callable[[], float]], reps_s: float) -> dict[str, list[float]]:
    """ms of each timed call of each variant: two untimed calls of each (compile, tune), then rounds of one call
    of every variant in turn, at least ``reps_s`` seconds of the slowest variant's calls (3-20 rounds).

    In turns, not one variant after the other: drift of the host or of the GPU clocks over a run (a ~2-10 ms
    step timed one variant after another moved 6% between runs of an identical graph) falls on every variant.
    ``calls`` map a variant to a function that makes one call and returns its ms.
    """
    slowest = 0.0
    for call in calls.values():
        call()
        slowest = max(slowest, call())
    reps = max(3, min(20, math.ceil(reps_s * 1e3 / max(slowest, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            times[name].append(call())
    return times


def site_decision(model: torch.nn.Module, since_graph: int) -> tuple[str, str]:
    """(``"sparse"`` | ``"dense"`` | ``"mixed"``, the dense reasons) of rainfusion's sites since the last reset;
    where no op ran, the video sites the pass kept as SDPA in the graphs compiled since ``since_graph``."""
    sites = [s for s in rf_compile.stats(model).values() if s["calls"] or s["dense_shapes"]]
    if not sites:
        kept = [site for report in reports_since(since_graph) for site in report.sites
                if site.status == "dense" and site.seq_len == site.kv_len]  # fmt: skip
        return ("dense", "; ".join(sorted({site.reason for site in kept}))) if kept else ("none", "")
    sparse = sum(s["sparse_calls"] for s in sites)
    reasons = sorted({reason for s in sites for reason in s["dense_shapes"]})
    return ("sparse" if not reasons else "dense" if not sparse else "mixed"), "; ".join(reasons)


def estimate_ratio(preset, spec_options: dict) -> float:
    """The cost model's sparse / dense estimate for this preset's video sites (NaN off CUDA)."""
    if not torch.cuda.is_available():
        return math.nan
    (layout,) = preset.expected_layouts
    config = preset.model.config
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    costs = cost.costs_for(torch.device("cuda"), "triton")
    rf = RainFusionConfig.from_options(spec_options)[0]
    return cost.estimate(rf, layout, preset.args[0].shape[0], heads, head_dim, costs).ratio


def presets_at(key: str, tokens: list[int], layers: int, device: str, dtype: torch.dtype) -> dict:
    """The preset at each length, all holding the first one's model (the grids differ only in their inputs)."""
    presets = {n: inputs_at(key, n, layers, device, dtype) for n in tokens}
    model = presets[tokens[0]].model.eval().requires_grad_(False)
    for preset in presets.values():
        preset.model = model
    return presets


def run_shape(key: str, names: list[str], presets: dict, reps_s: float) -> list[dict]:
    """Every length of ``presets`` for every variant of ``names``, each compiled once on its own copy of the
    model (the same weights) and timed in turns with the others (``time_in_turns``)."""
    model_spec = MODELS[key]
    first = next(iter(presets.values()))
    models = {name: first.model if i == 0 else copy.deepcopy(first.model) for i, name in enumerate(names)}
    layers = sum(type(m).__name__ in model_spec.blocks for m in first.model.modules())
    regional = tuple(getattr(first.model, "_repeated_blocks", None) or model_spec.blocks)
    t = model_spec.schedule(50, first.args[0].dtype)[0]
    records = []
    served = {name: ("none", "") for name in names}  # each variant's last compile-time decision
    torch._dynamo.reset()
    with contextlib.ExitStack() as stack, torch.no_grad():
        # Every variant's blocks share one code object, whose compiles Dynamo counts together against its recompile
        # limit (8): CogVideoX's two blocks take two graphs per length regime (their inputs' strides differ), and
        # rainfusion has three regimes (static first length, symbolic below the cost model's floor, above it) to
        # inductor's two, 10 in all.
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=32))
        compiled = {name: stack.enter_context(_compiled(models[name], VARIANTS[name], "default", 50, regional, {}))
                    for name in names}  # fmt: skip
        for n, preset in presets.items():
            rf_compile.reset()
            since = compiled_graphs()
            calls = {name: functools.partial(_timed_ms, compiled[name], preset, t) for name in names}
            times = time_in_turns(calls, reps_s)
            (layout,) = preset.expected_layouts
            config = first.model.config
            for name in names:
                spec = VARIANTS[name]
                record = {
                    "model": model_spec.name, "layers": layers, "seq_len": layout.seq_len, "video_tokens": n,
                    "heads": config.num_attention_heads, "head_dim": config.attention_head_dim,
                    "batch": preset.args[0].shape[0], "variant": name,
                    "ms_per_step": statistics.median(times[name]), "ms_steps": times[name],
                }  # fmt: skip
                if spec["backend"] == "rainfusion":
                    decision = site_decision(models[name], since)
                    if decision[0] == "none":  # no op ran and nothing compiled: a graph kept dense earlier served it
                        decision = served[name]
                    served[name] = record["decision"], record["reason"] = decision
                    record["est_ratio"] = estimate_ratio(preset, spec["options"])
                records.append(record)
                _log(f"{model_spec.name} {name} {n:,} tokens: {record['ms_per_step']:.2f} ms a step"
                     + (f" ({record['decision']})" if "decision" in record else ""))  # fmt: skip
    return records


def _timed_ms(model, preset, t: torch.Tensor) -> float:
    return _timed_call(model, preset, preset.args[0], t)[1]


def add_speedups(records: list[dict]) -> None:
    """``speedup_vs_inductor``: inductor's step over the record's, same model, layers and length (NaN without)."""
    inductor = {(r["model"], r["layers"], r["video_tokens"]): r["ms_per_step"] for r in records
                if r["variant"] == "inductor"}  # fmt: skip
    for r in records:
        base = inductor.get((r["model"], r["layers"], r["video_tokens"]))
        r["speedup_vs_inductor"] = base / r["ms_per_step"] if base else math.nan


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    lines = sorted({(r["model"], r["heads"], r["head_dim"], r["variant"]) for r in records
                    if r["variant"] != "inductor"})  # fmt: skip
    for model, heads, head_dim, variant in lines:
        points = sorted((r["video_tokens"], r["speedup_vs_inductor"]) for r in records
                        if (r["model"], r["variant"]) == (model, variant))  # fmt: skip
        style = {"rf": "-o", "rf_v2": "--s"}.get(variant, ":x")
        ax.plot(*zip(*points), style, label=f"{variant}, {model} ({heads} x {head_dim})")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(0.98, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("video tokens")
    ax.set_ylabel("step speed-up over inductor")
    ax.legend(fontsize=7)
    fig.suptitle("rainfusion (cost model on / off) vs inductor, a few blocks, CFG batch 2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(records: list[dict], env: dict, out_dir: Path, stem: str) -> str:
    add_speedups(records)
    columns = ["model", "heads", "head_dim", "video_tokens", "seq_len", "variant", "ms_per_step",
               "speedup_vs_inductor", "decision", "est_ratio", "reason"]  # fmt: skip
    table = markdown_table(records, columns)
    skipped = env.get("skipped")
    markdown = (
        f"# Crossover: rainfusion vs inductor by sequence length\n\nenv: {env}\n\nbf16, random weights, "
        f"{records[0]['layers'] if records else '?'} blocks, regional compilation, CFG batch 2; rf: defaults "
        "(cost model on), rf_sparse: cost_model=False; both with dense_warmup=0 (sparse-phase steps). "
        "ms_per_step: median of the timed calls, the variants timed in turns; est_ratio: the cost model's "
        f"sparse / dense attention estimate; decision: what rainfusion's sites did.\n\n{table}\n"
        + (f"\nSkipped (time budget): {', '.join(skipped)}\n" if skipped else "")
    )
    write_results(out_dir, stem, env, records, markdown)
    if records:
        plot(records, out_dir / f"{stem}.png")
    return table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(MODELS),
                        help="e2e.py model keys whose head shapes to sweep (default: wan1.3b cogvideox)")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(GRIDS), choices=list(GRIDS),
                        help="video token counts (default: all)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help="default: inductor rf rf_sparse (inductor always runs: the others' base)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--reps-s", type=float, default=0.3, help="seconds of timed calls per length (3-20 calls)")
    parser.add_argument("--budget-minutes", type=float, default=4.5,
                        help="skip the next head shape when the time spent plus the longest so far would pass this")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--name", default="crossover", help="file stem (default crossover)")
    args = parser.parse_args()  # fmt: skip
    args.tokens = sorted(args.tokens)
    args.variants = ["inductor", *(v for v in VARIANTS if v in args.variants and v != "inductor")]
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("crossover.py times the Triton kernel: it needs a CUDA GPU")
    env = {**environment(), "skipped": []}
    out_dir = args.out or Path(__file__).parent / "results" / gpu_slug(env["gpu"])
    deadline = time.perf_counter() + args.budget_minutes * 60
    records: list[dict] = []
    table = ""
    longest = 0.0  # the longest head shape so far: what the budget check expects next
    for key in args.shapes:
        if time.perf_counter() + longest > deadline:
            env["skipped"].append(MODELS[key].name)
            _log(f"{MODELS[key].name}: skipped, the time budget would not cover it")
            continue
        start = time.perf_counter()
        presets = presets_at(key, args.tokens, args.layers, "cuda", torch.bfloat16)
        records += run_shape(key, args.variants, presets, args.reps_s)
        longest = max(longest, time.perf_counter() - start)
        table = write(records, env, out_dir, args.name)
        del presets
        torch.cuda.empty_cache()
    print(table)


if __name__ == "__main__":
    main()
