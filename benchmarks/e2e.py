"""Compile-vs-eager end to end: what ``backend="rainfusion"`` does to a whole video transformer.

Real-size configs (random bf16 weights, no downloads) of CogVideoX-5B, HunyuanVideo and
Wan2.1-14B, cut to ``--layers`` blocks, run a short Euler denoising loop (the first 10% of the
trajectory dense, as RainFusion's warm-up). Variants, in one run on one GPU: eager (diffusers'
SDPA), inductor, rainfusion ``mode="dense"``, v1, v1+ and v2 (80% block sparsity). Per variant: median ms per step,
speed-ups, attention share of the step (profiler), compile time, peak memory, graph breaks,
recompiles and the relative error of the final latent against inductor. ``--modes`` runs every
compiled variant under each ``torch.compile`` mode (``reduce-overhead`` and ``max-autotune`` use CUDA
graphs). Writes ``e2e.json``, ``e2e.md`` and ``e2e.png`` under ``benchmarks/results/<gpu>/``
(``--name`` changes the file stem).

    python benchmarks/e2e.py --layers 4                                    # GPU
    python benchmarks/e2e.py --modes default reduce-overhead --name e2e_modes
    python benchmarks/e2e.py --size tiny --steps 3                         # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm
from utils import environment, gpu_slug, markdown_table, write_results

from rf_compile.backend import rainfusion
from rf_compile.presets import build_preset

MODELS = {"cogvideox": "CogVideoX-5B", "hunyuanvideo": "HunyuanVideo", "wan": "Wan2.1-14B"}
CFG_BATCH = {"cogvideox": 2, "hunyuanvideo": 1, "wan": 2}  # HunyuanVideo uses embedded guidance
VARIANTS = {
    "eager": None,
    "inductor": {"backend": "inductor"},
    "rf_dense": {"backend": "rainfusion", "options": {"mode": "dense"}},
    "rf_v1": {"backend": "rainfusion", "options": {"mode": "v1"}},
    "rf_v1plus": {"backend": "rainfusion", "options": {"mode": "v1+"}},
    "rf_v2": {"backend": "rainfusion", "options": {"mode": "v2"}},
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_KERNELS = ("attention", "attn", "fmha", "flash", "cudnn", "sdpa", "block_sparse", "band_recall")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _denoise(model, preset, timesteps: list[float], progress: str) -> tuple[torch.Tensor, list[float]]:
    """Euler steps ``x += (t_next - t) / 1000 * model(x, t)``; returns the final latent and ms per step."""
    x = preset.args[0]
    kwargs = dict(preset.kwargs)
    times = []
    for t, t_next in tqdm(list(zip(timesteps, [*timesteps[1:], 0.0])), desc=progress, unit="step", leave=False):
        kwargs["timestep"] = torch.full_like(preset.kwargs["timestep"], t)
        _sync()
        start = time.perf_counter()
        out = model(x, *preset.args[1:], **kwargs)[0]
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
        x = x + (t_next - t) / 1000.0 * out
    return x, times


def _attention_share(model, preset, timestep: float) -> float:
    """Share of device (or CPU) kernel time spent in attention kernels during one step at ``timestep``."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
    kwargs = dict(preset.kwargs)
    kwargs["timestep"] = torch.full_like(preset.kwargs["timestep"], timestep)
    with torch.profiler.profile(activities=activities) as prof:
        model(*preset.args, **kwargs)
        _sync()
    attr = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, attr) for e in events)
    attention = sum(getattr(e, attr) for e in events if any(n in e.key.lower() for n in ATTENTION_KERNELS))
    return attention / total if total else float("nan")


def run_variant(name: str, spec: dict | None, preset, timesteps: list[float], mode: str = "default") -> dict:
    torch._dynamo.reset()
    counters.clear()
    model = preset.model
    if spec is not None:
        # The backend callable itself, so the benchmark runs without the package installed (no entry point).
        backend = rainfusion if spec["backend"] == "rainfusion" else spec["backend"]
        if spec["backend"] == "rainfusion":
            # The warm-up covers the first 10% of this loop's steps; the mode goes in as an option
            # (torch.compile refuses mode= together with options=).
            options = {"num_steps": len(timesteps), "compile_mode": mode, **spec["options"]}
            model = torch.compile(model, backend=backend, options=options)
        else:
            model = torch.compile(model, backend=backend, mode=None if mode == "default" else mode)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        _sync()
        start = time.perf_counter()
        model(*preset.args, **preset.kwargs)  # compiles
        _sync()
        compile_s = time.perf_counter() - start
        frames_after_compile = counters["frames"]["ok"]
        latent, times = _denoise(model, preset, timesteps, name)
        recompiles = counters["frames"]["ok"] - frames_after_compile
        share = _attention_share(model, preset, timesteps[-1] / 2)  # one more (sparse) step of the same video
    return {
        "variant": name,
        "mode": mode if spec is not None else "eager",
        "ms_per_step": statistics.median(times),
        "ms_steps": times,
        "compile_s": compile_s if spec is not None else 0.0,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "attention_share": share,
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles": recompiles,
        "latent": latent,
    }


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(record: dict) -> str:
        mode = record.get("mode", "default")
        return record["variant"] if mode in ("default", "eager") else f"{record['variant']} [{mode}]"

    models = list(dict.fromkeys(r["model"] for r in records))
    variants = list(dict.fromkeys(label(r) for r in records))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        by_model = {r["model"]: r["ms_per_step"] for r in records if label(r) == variant}
        values = [by_model.get(m, 0) for m in models]
        ax.bar([j + i * width for j in range(len(models))], values, width, label=variant)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
    ax.set_ylabel("ms per denoising step (median)")
    ax.set_title(f"End to end, {records[0]['layers']} layers per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(records: list[dict], args, env: dict, out_dir: Path, dtype: torch.dtype) -> str:
    columns = [
        "model", "variant", "mode", "ms_per_step", "speedup_vs_eager", "speedup_vs_inductor", "attention_share",
        "compile_s", "peak_gib", "graph_breaks", "recompiles", "rel_err",
    ]  # fmt: skip
    table = markdown_table(records, columns)
    markdown = (
        f"# End to end: compile vs eager\n\nenv: {env}\n\n{args.layers} transformer blocks per model, "
        f"{args.steps} Euler steps (first 10% of the trajectory dense), CFG batch where the model uses it, "
        f"{dtype}. ms_per_step: median over the steps; rel_err: final latent vs inductor.\n\n{table}\n"
    )
    write_results(out_dir, args.name, env, records, markdown)
    plot(records, out_dir / f"{args.name}.png")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks per model (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: CPU smoke run")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--modes", nargs="+", default=["default"], choices=COMPILE_MODES,
                        help="torch.compile modes to run every compiled variant under (default: default)")
    parser.add_argument("--name", default="e2e", help="file stem of the results (default e2e)")
    parser.add_argument("--append", action="store_true", help="keep the other models' records of an existing json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch._inductor.config.force_disable_caches = True  # compile times without cache hits between variants
    env = environment()
    out_dir = args.out or Path(__file__).parent / "results" / gpu_slug(env.get("gpu", "cpu"))
    timesteps = torch.linspace(999, 0, args.steps + 1)[:-1].tolist()
    records = []
    if args.append and (out_dir / f"{args.name}.json").exists():
        names = {MODELS[key] for key in args.models}
        old = json.loads((out_dir / f"{args.name}.json").read_text())["records"]
        records = [r for r in old if r["model"] not in names]
    for key in args.models:
        preset = build_preset(key, args.size, batch=CFG_BATCH[key], device=device, dtype=dtype, layers=args.layers)
        preset.model.eval().requires_grad_(False)
        eager = run_variant("eager", None, preset, timesteps) if "eager" in args.variants else None
        for mode in args.modes:
            results = {
                name: run_variant(name, VARIANTS[name], preset, timesteps, mode)
                for name in args.variants
                if name != "eager"
            }
            if eager is not None and mode == args.modes[0]:
                results = {"eager": eager, **results}
            base = results.get("inductor") or next(iter(results.values()))
            base_latent = base["latent"].double()
            for result in results.values():
                latent = result.pop("latent")
                rel_err = ((latent.double() - base_latent).norm() / base_latent.norm()).item()
                records.append(
                    {
                        "model": MODELS[key],
                        "layers": args.layers,
                        "batch": CFG_BATCH[key],
                        **result,
                        "speedup_vs_eager": eager["ms_per_step"] / result["ms_per_step"] if eager else float("nan"),
                        "speedup_vs_inductor": base["ms_per_step"] / result["ms_per_step"],
                        "rel_err": rel_err,
                    }
                )
        del preset
        if cuda:
            torch.cuda.empty_cache()
        table = write(records, args, env, out_dir, dtype)  # after each model: a cut-off run keeps its results
    print(table)


if __name__ == "__main__":
    main()
