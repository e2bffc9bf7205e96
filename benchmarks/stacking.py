"""Stacking, timed: inductor and rainfusion alone, with diffusers' first-block cache, with torchao float8 linears.

Issue 24, item 4. One run on one GPU, side by side, of Wan2.1-1.3B at full depth and 480p: the model, shapes,
batch and schedule of ``benchmarks/e2e.py --config full --models wan1.3b`` (imported from it, not copied): 30
blocks of 12 x 128 heads, 832x480 and 81 frames (21 x 30 x 52 = 32,760 tokens), CFG batch 2, random weights,
bf16, the pipeline's UniPC timesteps (flow shift 3.0, 50 steps, the first ceil(0.1 x 50) = 5 dense for
rainfusion). Not a quality benchmark: random weights say nothing about what the cache or float8 cost in quality.

Combinations, run in this order (the most important first, since ``--budget-minutes`` skips the rest):

1. ``inductor`` alone (``torch.compile``'s default backend: the baseline of every speed-up),
2. ``rainfusion`` alone (``backend="rainfusion"``, default options: v1, cost model on),
3. each with diffusers' first-block cache (``apply_first_block_cache(transformer,
   FirstBlockCacheConfig(threshold=...))``, applied before compiling),
4. each with torchao float8 linears (``quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(
   granularity=PerRow()))``, every ``nn.Linear`` whose dimensions are multiples of 16, before compiling).

A combination that cannot run here is recorded as skipped with the reason (torchao not importable, no CUDA GPU of
compute capability 8.9 or later for float8, the time budget); one that raises is recorded as failed with the error,
and the run goes on. Each stack gets a freshly built model (seed 0: the same weights in every combination).

What is timed, per combination (every call at the pipeline's timesteps, ``t`` = the schedule):

1. a call at t[0] that compiles (``compile_s``; dense for rainfusion, as the pipeline's first step);
2. t[1] .. t[w-1] are not computed: the device's step clock is ticked with them, as in ``e2e.py``;
3. an untimed call at t[w], the first after the warm-up (rainfusion: Triton compiles and tunes the sparse kernels);
4. ``--steps`` timed steps at t[w+1], t[w+2], ...: a short denoising loop, the latent moving by an Euler step to
   the next timestep after each (``e2e.py``'s update), so that consecutive inputs change as in a pipeline;
   ``ms_per_step`` is their mean (a skipped step of the cache costs what it costs), ``ms_step_median`` their median.
   For rainfusion every timed step is a sparse step.

With the first-block cache every call runs in the transformer's ``cache_context("cond", ...)`` as the pipelines
do (one context: the CFG batch of 2 is one call here, as in ``e2e.py``). Its compute and skip paths both compile
before the loop: 1. and 3. are each followed by the same call again (same input: the cache skips), and the cache
is reset before 3. (so that it computes there) and before the loop (so the loop starts as a video does: its first
step computes). ``steps_computed`` / ``steps_total``: the loop's steps in which the cache ran the remaining blocks
(read from the cache's state after each step). ``compiles_in_loop``: graphs Dynamo compiled during the timed loop
(0 unless a step met a guard the warm-up did not; its time is then in ``ms_steps``).

Records (``<name>.json`` and ``<name>.md``, rewritten after every combination, so a run cut short keeps what it
finished): ``model, seq_len, layers, batch, regional, compiler, stack`` ("alone" | "first_block_cache" |
"torchao_float8"), ``status`` ("ok" | "skipped" | "failed") and ``reason``, ``ms_per_step, ms_step_median,
ms_steps, timesteps, speedup_vs_inductor_alone`` (inductor alone's ``ms_per_step`` over this one's, same run),
``rel_err_vs_inductor_alone`` (the loop's final latent against inductor alone's; the trajectories start equal),
``compile_s, peak_gib, graph_breaks, graphs, compiles_in_loop``; first-block cache: ``fbc_threshold,
steps_computed, steps_total``; rainfusion: ``sites, sparse_sites`` (sites with sparse calls, from
``rf_compile.stats``), ``dense_calls, sparse_calls, sparsity``; float8: ``float8_linears`` ("quantized of all").
The environment: GPU, torch, triton, diffusers and torchao versions, the command line, the options.

Inductor's caches stay on (unlike ``e2e.py``, which measures compile times): a graph that two combinations share
(a block's, alone and under the cache's hooks) may compile from the cache the second time; compile time is not
what this measures, and the device time is short.

Options:

``--config full|tiny``    full (default): the configuration above; tiny: ``e2e.py``'s tiny Wan2.1-1.3B (2 blocks,
                          3 x 4 x 6 tokens; rainfusion with ``min_video_tokens=0, cost_model=False`` so its sites
                          run sparse), float32 on CPU (bf16 on a GPU): a smoke run, minutes on a CPU for
                          inductor's C++ compiles (the test stubs them out and takes seconds)
``--compilers NAME ...``  inductor rainfusion (default both)
``--stacks NAME ...``     alone first_block_cache torchao_float8 (default all; run in this order)
``--steps K``             timed steps of the denoising loop (default 10)
``--num-steps N``         the pipeline's steps: its schedule and rainfusion's warm-up (default 50)
``--fbc-threshold X``     ``FirstBlockCacheConfig(threshold=X)`` (default 0.2, the value of diffusers' own example
                          in ``apply_first_block_cache``; the dataclass's 0.05 would compute every step here: with
                          random weights the first block's residual changes by 16-20% per step over t[6..15],
                          measured on CPU with the full-width blocks at a 3 x 30 x 52 grid, where 0.2 computed 3
                          of 10 steps)
``--regional``            compile the repeated blocks one by one (``e2e.py --regional``): one graph per block class,
                          so full depth compiles in about the time of one block
``--budget-minutes M``    before each combination, skip it (recorded with the reason) when the time spent plus the
                          longest combination so far would pass M minutes
``--out DIR``             output folder (default ``benchmarks/results/<gpu>``)
``--name STEM``           file stem (default stacking)

    python benchmarks/stacking.py --regional --budget-minutes 5          # GPU: the six combinations, ~3.5 min
    python benchmarks/stacking.py --config tiny --out /tmp/stacking      # CPU smoke run (float8 skipped)

The GPU estimate (H100, not yet run): e2e.py's H200 run of this model compiled regionally in 11-14 s per compiler
with a 1.04 s dense (inductor) and 0.72 s sparse (rainfusion v1) step, so each combination is its compile plus 12
calls: about 25 s alone, 20-25 s with the cache (skipped steps run one block), 35-40 s with float8 (more to
compile), 3-3.5 minutes with the imports and three model builds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import statistics
import time
import traceback
from pathlib import Path

import torch
from e2e import MODELS, _call, _compiled, _fresh_start, _log, _site_calls, _sync, _timed_call
from torch._dynamo.utils import counters
from utils import environment, gpu_slug, markdown_table, write_results

import rf_compile
from rf_compile.config import RainFusionConfig
from rf_compile.ops.runtime.clock import step_clock
from rf_compile.presets import build_preset

MODEL = "wan1.3b"  # e2e.py's key: Wan2.1-1.3B, CFG batch 2, UniPC at flow shift 3.0
COMPILERS = {
    "inductor": {"backend": "inductor"},
    "rainfusion": {"backend": "rainfusion", "options": {}},  # default options (e2e adds num_steps)
}
STACKS = ("alone", "first_block_cache", "torchao_float8")
FBC_LEADER_HOOK = "fbc_leader_block_hook"  # diffusers.hooks.first_block_cache._FBC_LEADER_BLOCK_HOOK
NUM_STEPS = 50
GROUP = ("model", "seq_len", "layers", "regional")  # records compared with each other
_START = time.perf_counter()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def float8_unavailable() -> str | None:
    """Why torchao float8 linears cannot run here, or None."""
    try:
        import torchao.quantization  # noqa: F401
    except Exception as error:  # ImportError, or a torchao that fails on this torch
        return f"torchao not importable ({type(error).__name__}: {error})"
    if not torch.cuda.is_available():
        return "torchao float8 needs a CUDA GPU of compute capability 8.9 or later (this run: CPU)"
    if torch.cuda.get_device_capability() < (8, 9):
        name, capability = torch.cuda.get_device_name(), ".".join(map(str, torch.cuda.get_device_capability()))
        return f"torchao float8 needs compute capability 8.9 or later ({name}: {capability})"
    return None


def _preset(config: str, device: str, dtype: torch.dtype):
    """``e2e.py``'s Wan2.1-1.3B of its full config (or its tiny size), built as ``e2e.py`` builds it (seed 0)."""
    spec = MODELS[MODEL]
    size, grid = ("tiny", None) if config == "tiny" else ("full", spec.full_latent)
    preset = build_preset(spec.preset, size, batch=spec.batch, device=device, dtype=dtype, latent=grid)
    return preset.model.eval().requires_grad_(False), preset


def describe(config: str, regional: bool) -> dict:
    """The fields every record of the run shares (built on the meta device: no memory, no time)."""
    model, preset = _preset(config, "meta", torch.bfloat16)
    (layout,) = preset.expected_layouts
    blocks = sum(type(m).__name__ in MODELS[MODEL].blocks for m in model.modules())
    return {"model": MODELS[MODEL].name, "seq_len": layout.seq_len, "layers": blocks, "batch": MODELS[MODEL].batch,
            "regional": regional}  # fmt: skip


def build(stack: str, args, device: str, dtype: torch.dtype):
    """A fresh preset (seed 0: the same weights every time) with ``stack`` applied to its transformer, and what
    the stack adds to the records."""
    _, preset = _preset(args.config, device, dtype)
    extra: dict = {}
    if stack == "first_block_cache":
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(preset.model, FirstBlockCacheConfig(threshold=args.fbc_threshold))
        extra["fbc_threshold"] = args.fbc_threshold
    elif stack == "torchao_float8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        linears = [m for m in preset.model.modules() if isinstance(m, torch.nn.Linear)]
        quantize_(preset.model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        # torchao leaves a linear whose dimensions are not multiples of 16 as it was (a plain tensor weight)
        quantized = sum("float8" in type(m.weight).__name__.lower() for m in linears)
        extra["float8_linears"] = f"{quantized} of {len(linears)}"
    return preset, extra


def _fbc_state(model: torch.nn.Module):
    """The first-block cache's shared state of the current cache context (None without the cache)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(FBC_LEADER_HOOK) if registry is not None else None
        if hook is not None:
            return hook.state_manager.get_state()
    return None


def run_combination(compiler: str, stack: str, preset, schedule: torch.Tensor, args, rf_options: dict) -> dict:
    """Compile, warm up and time the loop of one combination (see the module docstring); a record plus ``latent``."""
    spec = COMPILERS[compiler]
    num_steps = len(schedule)
    warmup = RainFusionConfig(num_steps=num_steps).warmup_steps
    fbc = stack == "first_block_cache"
    timed = list(range(warmup + 1, warmup + 1 + args.steps))
    clock = step_clock(preset.args[0].device)
    _fresh_start()
    transformer = preset.model

    def context(index: int):
        """The cache context a pipeline opens around the call of step ``index`` (the cache only)."""
        if not fbc:
            return contextlib.nullcontext()
        t = schedule[index].item()
        return transformer.cache_context("cond", step_index=index, num_inference_steps=num_steps, timestep=t)

    def untimed(model, latent: torch.Tensor, index: int, reset: bool) -> float:
        """A call at t[index], and with the cache the same call again (it skips): both paths compile."""
        if fbc and reset:
            transformer._reset_stateful_cache()
        with context(index):
            _, ms = _timed_call(model, preset, latent, schedule[index])
        if fbc:
            with context(index):
                _call(model, preset, latent, schedule[index])
        return ms

    latent = preset.args[0]
    with _compiled(transformer, spec, "default", num_steps, args.regional_blocks, rf_options) as model:
        with torch.no_grad():
            _log(f"  {compiler} + {stack}: first call at t={schedule[0].item():g} (compiles)")
            compile_ms = untimed(model, latent, 0, reset=True)
            for t in schedule[1:warmup]:  # steps not computed: the clock counts them as the pipeline would
                clock.tick(t)
            _log(f"  {compiler} + {stack}: untimed call at t={schedule[warmup].item():g} (after the warm-up)")
            untimed(model, latent, warmup, reset=True)
            if fbc:
                transformer._reset_stateful_cache()  # the loop starts as a video does: its first step computes
            graphs_before = counters["stats"]["unique_graphs"]
            times, computed = [], []
            for index in timed:
                with context(index):
                    out, ms = _timed_call(model, preset, latent, schedule[index])
                    if fbc:
                        computed.append(bool(_fbc_state(transformer).should_compute))
                times.append(ms)
                note = f", {'computed' if computed[-1] else 'skipped (cache)'}" if fbc else ""
                _log(f"  {compiler} + {stack}: step {index} (t={schedule[index].item():g}) {ms:.1f} ms{note}")
                t_next = schedule[index + 1].item() if index + 1 < num_steps else 0.0
                latent = latent + (t_next - schedule[index].item()) / 1000.0 * out  # Euler, as e2e.py
            _sync()
    record = {
        "status": "ok",
        "reason": "",
        "ms_per_step": statistics.mean(times),
        "ms_step_median": statistics.median(times),
        "ms_steps": times,
        "timesteps": [schedule[i].item() for i in timed],
        "num_steps": num_steps,
        "warmup_steps": warmup,
        "compile_s": compile_ms / 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else math.nan,
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "compiles_in_loop": counters["stats"]["unique_graphs"] - graphs_before,
        "latent": latent,
    }
    if fbc:
        record.update(steps_computed=sum(computed), steps_total=len(computed))
    if compiler == "rainfusion":
        sites = [s for s in rf_compile.stats(transformer).values() if s["calls"]]
        record.update(_site_calls(transformer), sparse_sites=sum(s["sparse_calls"] > 0 for s in sites))
    return record


def add_speedups(records: list[dict]) -> None:
    """``speedup_vs_inductor_alone`` of every timed record against inductor alone of its group (NaN without one)."""
    for record in records:
        base = next((r for r in records if all(r.get(k) == record.get(k) for k in GROUP)
                     and (r["compiler"], r["stack"], r["status"]) == ("inductor", "alone", "ok")), None)  # fmt: skip
        timed = base is not None and record["status"] == "ok"
        record["speedup_vs_inductor_alone"] = base["ms_per_step"] / record["ms_per_step"] if timed else math.nan


def write(records: list[dict], args, env: dict, out_dir: Path) -> str:
    columns = [
        "compiler", "stack", "ms_per_step", "ms_step_median", "speedup_vs_inductor_alone", "steps_computed",
        "steps_total", "sparse_sites", "sites", "float8_linears", "rel_err_vs_inductor_alone", "compile_s",
        "compiles_in_loop", "graph_breaks", "peak_gib", "status", "reason",
    ]  # fmt: skip
    add_speedups(records)
    table = markdown_table(records, columns)
    shape = next((f"{r['model']}, {r['layers']} blocks, {r['seq_len']} tokens, batch {r['batch']}, "
                  f"{'regional' if r['regional'] else 'whole-model'} compilation" for r in records), "")  # fmt: skip
    timesteps = next((r["timesteps"] for r in records if r["status"] == "ok"), [])
    markdown = (
        f"# Stacking: compilers with the first-block cache and torchao float8\n\nenv: {env}\n\n{shape}; random "
        f"weights. Per combination: a compiling call at t[0], an untimed call after rainfusion's warm-up, then a "
        f"timed loop of {args.steps} denoising steps (Euler updates between them) at t = "
        f"{', '.join(f'{t:g}' for t in timesteps)} of the pipeline's schedule: every rainfusion step is sparse. "
        "ms_per_step: the loop's mean (a step the cache skips counts at its cost); speedup_vs_inductor_alone: "
        "inductor alone's ms_per_step over the row's. steps_computed / steps_total: the loop's steps in which the "
        "first-block cache ran the remaining blocks (random weights: not what trained weights would give). "
        "rel_err_vs_inductor_alone: the loop's final latent against inductor alone's.\n\n"
        f"{table}\n"
    )
    write_results(out_dir, args.name, env, records, markdown)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full", choices=["full", "tiny"],
                        help="full: Wan2.1-1.3B, 30 blocks, 480p; tiny: a CPU smoke run")
    parser.add_argument("--compilers", nargs="+", default=list(COMPILERS), choices=list(COMPILERS))
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the denoising loop (default 10)")
    parser.add_argument("--num-steps", type=int, default=NUM_STEPS, help=f"the pipeline's steps (default {NUM_STEPS})")
    parser.add_argument("--fbc-threshold", type=float, default=0.2, help="the first-block cache's threshold")
    parser.add_argument("--regional", action="store_true", help="compile the repeated blocks, not the whole model")
    parser.add_argument("--budget-minutes", type=float, help="skip combinations that would end past this")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--name", default="stacking", help="file stem of the results (default stacking)")
    args = parser.parse_args(argv)  # fmt: skip
    warmup = RainFusionConfig(num_steps=args.num_steps).warmup_steps
    if args.steps < 1 or warmup + 1 + args.steps > args.num_steps:
        parser.error(f"--steps must be >= 1 with {warmup} warm-up steps + 1 untimed + --steps <= --num-steps "
                     f"{args.num_steps}")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    spec = MODELS[MODEL]
    args.regional_blocks = spec.blocks if args.regional else None
    env = {
        **environment(),
        "diffusers": _version("diffusers"),
        "torchao": _version("torchao"),
        "config": args.config,
        "steps": args.steps,
        "fbc_threshold": args.fbc_threshold,
        "budget_minutes": args.budget_minutes,
    }
    out_dir = args.out or Path(__file__).parent / "results" / gpu_slug(str(env.get("gpu", "cpu")))
    deadline = math.inf if args.budget_minutes is None else _START + args.budget_minutes * 60
    # Tiny grids are below the default 256 video tokens, and the cost model would keep them dense.
    rf_options = {"min_video_tokens": 0, "cost_model": False} if args.config == "tiny" else {}
    schedule = spec.schedule(args.num_steps, dtype)
    unavailable = {"torchao_float8": float8_unavailable()} if "torchao_float8" in args.stacks else {}
    group = describe(args.config, args.regional)
    records: list[dict] = []
    finals: dict[tuple[str, str], torch.Tensor] = {}
    longest = 0.0  # wall time of the longest combination so far: what the budget check expects next
    table = ""
    _log(f"{spec.name}: {args.config} config on {device}, {dtype}, combinations "
         f"{[f'{c} + {s}' for s in args.stacks for c in args.compilers]}")  # fmt: skip
    for stack in [s for s in STACKS if s in args.stacks]:
        preset = extra = None
        for compiler in [c for c in COMPILERS if c in args.compilers]:
            start = time.perf_counter()
            record = {**group, "compiler": compiler, "stack": stack}
            if unavailable.get(stack):
                record.update(status="skipped", reason=unavailable[stack])
            elif start + longest > deadline:
                spent = (start - _START) / 60
                record.update(status="skipped", reason=f"time budget: {spent:.1f} min spent + {longest / 60:.1f} "
                              f"min (the longest combination so far) > {args.budget_minutes:g} min")  # fmt: skip
            else:
                try:
                    if preset is None:
                        _log(f"{spec.name}: building the model for {stack}")
                        preset, extra = build(stack, args, device, dtype)
                    result = run_combination(compiler, stack, preset, schedule, args, rf_options)
                    finals[compiler, stack] = result.pop("latent").double().cpu()
                    record.update(**extra, **result)
                except Exception as error:  # one combination must not end the run: record it and go on
                    traceback.print_exc()
                    record.update(status="failed", reason=f"{type(error).__name__}: {error}"[:500])
                longest = max(longest, time.perf_counter() - start)
            base = finals.get(("inductor", "alone"))
            if record["status"] == "ok" and base is not None:
                final = finals[compiler, stack]
                record["rel_err_vs_inductor_alone"] = ((final - base).norm() / base.norm()).item()
            records.append(record)
            summary = f"{record['ms_per_step']:.1f} ms per step" if record["status"] == "ok" else record["reason"]
            _log(f"{compiler} + {stack}: {record['status']}: {summary} ({time.perf_counter() - start:.0f} s wall)")
            table = write(records, args, env, out_dir)
        del preset
        if cuda:
            torch.cuda.empty_cache()
    print(table, flush=True)
    return records


if __name__ == "__main__":
    main()
