"""Compile vs eager end to end: what ``backend="rainfusion"`` does to a video transformer, per step and per video.

Random weights (no downloads) of published video DiTs, fed as their diffusers pipelines feed them (CFG batch
where the pipeline uses it) at the timesteps of their pipelines' schedulers. Two configurations:

- ``--config quick`` (default): CogVideoX-5B, HunyuanVideo and Wan2.1-14B cut to ``--layers`` blocks
  (HunyuanVideo: that many dual- and single-stream blocks each) at the presets' grids (HunyuanVideo
  640x480, 125 frames), as in the tables of the README.
- ``--config full``: every block of Wan2.1-1.3B (30 blocks, 832x480, 81 frames: 32,760 tokens, CFG
  batch 2), CogVideoX-5B (42, 720x480, 49 frames: 17,550 video + 226 text tokens, CFG batch 2),
  HunyuanVideo (20 dual- + 40 single-stream, 1280x720, 129 frames: 118,800 video + 256 text tokens,
  batch 1 with embedded guidance), Wan2.1-14B (``wan14b``: 40 blocks of 40 x 128 heads, 1280x720, 81
  frames: 21 x 45 x 80 = 75,600 tokens, CFG batch 2, UniPC with flow shift 5.0; 28 GB of bf16 weights,
  made on the GPU in bf16) and HunyuanVideo-1.5 720p T2V (54 blocks, 1280x720, 121 frames: 111,600 video +
  1,985 text tokens, batch 1: its pipeline makes one such call per CFG branch).

Variants, in one run on one GPU: eager (diffusers' SDPA), inductor, rainfusion ``mode="dense"``, v1 (its predicted
non-local heads flat: ``sparsity_ramp=0``), the paper's v1 (``textural="checkerboard"``), v1+, v2 (80% block
sparsity, flat, see ``V2``) and v2 with 8-bit products (``precision="fp8"``, ``"int8"``). Each runs a few steps of
its model's real schedule (the diffusers scheduler with the published shift, ``num_steps`` = 50), chosen so that
rainfusion decides dense or sparse exactly as in the pipeline: w = ceil(0.1 * num_steps) warm-up steps are dense
(5 of 50), counted as the step clock counts the timesteps the model receives (``first_sparse_step``: HunyuanVideo
1.5's bf16 timesteps merge early steps, and w is 8 there).

1. a call at t[0] that compiles (``compile_s``; under CUDA graphs one more untimed call, which records them);
2. one timed dense step at t[0] (``dense_ms``);
3. t[1] .. t[w-1] are not computed: the device's step clock is ticked with them, as the model's calls would;
4. rainfusion's sparse modes only: an untimed call at t[w], where Triton compiles and tunes the sparse kernels;
5. ``--steps`` timed steps at t[w+1] ...; ``ms_per_step`` is their median for rainfusion's sparse modes (a
   sparse step), the median of every timed step (2 and 5) for the others;
6. a profiled step at the next timestep: the attention share of a step (``--no-profile`` skips it).

Between timed steps the latent moves by an Euler step to the next timed timestep; ``rel_err`` compares the
final latent with inductor's (or, when inductor did not run, with the run's first variant's; ``rel_err_vs``
names it, and its own ``rel_err`` is empty).

The whole video is extrapolated, not run: ``video_s = w * dense_ms + (num_steps - w) * ms_per_step`` for
rainfusion's sparse modes, ``num_steps * ms_per_step`` for the others. Speed-ups: of a step
(``speedup_vs_eager``, ``speedup_vs_inductor``) and of a video (``video_speedup_vs_eager``,
``video_speedup_vs_inductor``), against eager and inductor of the same model, depth, sequence, compilation
and mode. Also per variant: compile time, peak memory, graph breaks, recompiles, and for rainfusion the calls
its sites counted dense and sparse and the measured sparsity. Writes ``<name>.json``, ``<name>.md`` and
``<name>.png`` under ``benchmarks/results/<gpu>/`` after every variant, so a run cut short keeps what it
finished.

Options:

``--config quick|full``   the configuration above (default quick)
``--models KEY ...``      ``wan`` (Wan2.1-14B), ``wan14b`` (Wan2.1-14B, at 720p in the full config), ``wan1.3b``,
                          ``cogvideox``, ``hunyuanvideo``, ``hunyuanvideo1.5``; default: the config's models
``--variants NAME ...``   eager inductor rf_dense rf_v1 rf_v1_paper rf_v1plus rf_v2 rf_v2_fp8 rf_v2_int8 (default all;
                          run in this order; rf_v1_paper: v1 with the paper's checkerboard for non-local heads;
                          rf_v2_fp8 / rf_v2_int8: v2 with ``precision="fp8"`` / ``"int8"``, Hopper only: their
                          sites stay dense elsewhere)
``--layers N``            quick only: blocks per model (default 4)
``--steps K``             timed sparse-phase steps per variant (default 2)
``--num-steps N``         the pipeline's steps: its schedule, the warm-up and the extrapolation (default 50)
``--modes MODE ...``      ``torch.compile`` modes for every compiled variant (default: default)
``--regional``            compile the repeated blocks one by one (diffusers' ``compile_repeated_blocks``;
                          CogVideoX, which declares none: each ``CogVideoXBlock``) instead of the whole model:
                          one graph per block class, so full depth compiles in about the time of one block
``--budget-minutes M``    before each variant, skip it (listed in the results) when the time spent plus the
                          longest variant of that model so far would pass M minutes
``--no-profile``          skip the profiled step (one model call less per variant; no attention share)
``--dense-from-inductor`` rainfusion's sparse variants time no dense step (one model call less each): their
                          ``dense_ms`` is inductor's ``ms_per_step`` of the same run (``dense_from``), since
                          their warm-up computes dense SDPA through the op (1.00x inductor, README H100 table)
``--size full|tiny``      tiny: the presets' tiny models (a few blocks, small grids; rainfusion with
                          ``min_video_tokens=0, cost_model=False`` so they run sparse), a CPU smoke run
``--out DIR``             output folder (default ``benchmarks/results/<gpu>``)
``--name STEM``           file stem (default e2e)
``--append``              keep the records of an existing ``<name>.json`` that this run does not redo (same
                          model, depth, sequence, compilation, variant and mode): one variant per device call

    python benchmarks/e2e.py --layers 4                                         # GPU, quick
    python benchmarks/e2e.py --config full --models wan1.3b --regional --budget-minutes 8 --name e2e_full
    python benchmarks/e2e.py --config full --models hunyuanvideo --variants rf_v1 --regional --no-profile \\
        --name e2e_full --append                                                # one variant per call
    python benchmarks/e2e.py --config full --models wan14b --variants inductor rf_v1 rf_v2 rf_v2_fp8 --regional \\
        --no-profile --steps 1 --dense-from-inductor --budget-minutes 9 --name e2e_full_wan14b   # one 10-min call
    python benchmarks/e2e.py --size tiny --config full --models wan1.3b --variants eager rf_v1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters
from utils import environment, gpu_slug, markdown_table, write_results

import rf_compile
from rf_compile.backend import rainfusion
from rf_compile.config import RainFusionConfig
from rf_compile.ops.runtime.clock import step_clock
from rf_compile.ops.runtime.step_count import clock_counts
from rf_compile.presets import build_preset


def _wan_timesteps(num_steps: int, flow_shift: float = 3.0) -> torch.Tensor:
    """WanPipeline's schedule: UniPC on flow sigmas, ``flow_shift`` 3.0 at 480p, 5.0 at 720p (diffusers' Wan docs)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps


def _cogvideox_timesteps(num_steps: int) -> torch.Tensor:
    """CogVideoXPipeline's schedule: CogVideoX's DPM scheduler with trailing spacing, as the model card sets it.

    Its beta and SNR-shift settings move the noise levels, not the timesteps (the DDIM scheduler gives the same).
    """
    from diffusers import CogVideoXDPMScheduler

    scheduler = CogVideoXDPMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps


def _flow_euler_timesteps(num_steps: int, shift: float) -> torch.Tensor:
    """The HunyuanVideo pipelines' schedule: flow-matching Euler with ``shift``, on their linear sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    return scheduler.timesteps


@dataclasses.dataclass(frozen=True)
class Model:
    """A published model: its preset, the pipeline's batch and schedule, and its usual resolution."""

    name: str
    preset: str
    batch: int  # 2: the pipeline runs both CFG branches (Wan's as two batch-1 calls: the same work)
    blocks: tuple[str, ...]  # its transformer block classes: counted as `layers`, compiled one by one with --regional
    scheduler: str
    timesteps: Callable[[int], torch.Tensor]  # the pipeline's timesteps for num_steps steps, in its dtype
    full_latent: tuple[int, int, int] | None = None  # latent grid of --config full, where the preset's differs
    latent_dtype_timestep: bool = False  # the pipeline casts the timestep to the latents' dtype (as its model needs)

    def schedule(self, num_steps: int, dtype: torch.dtype) -> torch.Tensor:
        """The timesteps of ``num_steps`` steps as the pipeline passes them to the transformer."""
        timesteps = self.timesteps(num_steps)
        return timesteps.to(dtype) if self.latent_dtype_timestep else timesteps


WAN_BLOCKS = ("WanTransformerBlock",)
WAN_SCHEDULER = "UniPCMultistepScheduler, flow_shift 3.0"
MODELS = {
    "wan": Model("Wan2.1-14B", "wan", 2, WAN_BLOCKS, WAN_SCHEDULER, _wan_timesteps),
    "wan1.3b": Model("Wan2.1-1.3B", "wan1.3b", 2, WAN_BLOCKS, WAN_SCHEDULER, _wan_timesteps),
    "wan14b": Model(
        "Wan2.1-14B", "wan", 2, WAN_BLOCKS, "UniPCMultistepScheduler, flow_shift 5.0",
        functools.partial(_wan_timesteps, flow_shift=5.0),
        full_latent=(21, 90, 160),  # 1280x720, 81 frames: 21 x 45 x 80 = 75,600 tokens
    ),  # fmt: skip
    "cogvideox": Model(
        "CogVideoX-5B", "cogvideox", 2, ("CogVideoXBlock",), "CogVideoXDPMScheduler, trailing", _cogvideox_timesteps
    ),
    "hunyuanvideo": Model(
        "HunyuanVideo",
        "hunyuanvideo",
        1,
        ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"),
        "FlowMatchEulerDiscreteScheduler, shift 7.0",
        functools.partial(_flow_euler_timesteps, shift=7.0),
        full_latent=(33, 90, 160),  # 1280x720, 129 frames (the preset's own grid is 640x480, 125 frames)
    ),
    # HunyuanVideo15Pipeline runs CFG as two batch-1 calls per step (its guider): batch 1 here is half a step,
    # and keeps the [B, 1, N, N] masks of the dense variants (13 GB each at 113,585 tokens) within memory.
    "hunyuanvideo1.5": Model(
        "HunyuanVideo-1.5-720p-T2V",
        "hunyuanvideo1.5",
        1,
        ("HunyuanVideo15TransformerBlock",),
        "FlowMatchEulerDiscreteScheduler, shift 9.0 (the model card's 720p T2V setting)",
        functools.partial(_flow_euler_timesteps, shift=9.0),
        latent_dtype_timestep=True,  # HunyuanVideo15Pipeline: t.expand(batch).to(latents.dtype)
    ),
}
CONFIGS = {
    "quick": ("cogvideox", "hunyuanvideo", "wan"),
    "full": ("wan1.3b", "cogvideox", "hunyuanvideo", "wan14b", "hunyuanvideo1.5"),
}
NUM_STEPS = 50  # num_inference_steps of the Wan, CogVideoX and HunyuanVideo pipelines
# v2 runs flat here: the timed steps are the first sparse ones, where the default ramp keeps most blocks; a flat
# step has the ramp's mean density, so the extrapolated video is the ramped video's to first order.
V2 = {"mode": "v2", "sparsity_ramp": 0}
VARIANTS = {
    "eager": None,
    "inductor": {"backend": "inductor"},
    "rf_dense": {"backend": "rainfusion", "options": {"mode": "dense"}},
    "rf_v1": {"backend": "rainfusion", "options": {"mode": "v1", "sparsity_ramp": 0}},  # flat, as V2
    "rf_v1_paper": {"backend": "rainfusion", "options": {"mode": "v1", "textural": "checkerboard"}},
    "rf_v1plus": {"backend": "rainfusion", "options": {"mode": "v1+"}},
    "rf_v2": {"backend": "rainfusion", "options": V2},
    "rf_v2_fp8": {"backend": "rainfusion", "options": {**V2, "precision": "fp8"}},
    "rf_v2_int8": {"backend": "rainfusion", "options": {**V2, "precision": "int8"}},
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
ATTENTION_KERNELS = ("attention", "attn", "fmha", "flash", "cudnn", "sdpa", "block_sparse", "band_recall")
GROUP = ("model", "layers", "seq_len", "regional")  # records compared with each other for speed-ups
KEY = (*GROUP, "variant", "mode")  # one record per key; --append replaces records with the same key
_START = time.perf_counter()


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def is_sparse(spec: dict | None) -> bool:
    """Whether a variant computes sparse steps after the warm-up (rainfusion outside ``mode="dense"``)."""
    return spec is not None and spec["backend"] == "rainfusion" and spec["options"]["mode"] != "dense"


def video_seconds(ms_per_step: float, dense_ms: float, num_steps: int, warmup_steps: int, sparse: bool) -> float:
    """Whole-video transformer time, extrapolated from the measured steps (see the module docstring)."""
    if not sparse:
        return num_steps * ms_per_step / 1e3
    return (warmup_steps * dense_ms + (num_steps - warmup_steps) * ms_per_step) / 1e3


def first_sparse_step(schedule: torch.Tensor, warmup: int) -> int:
    """The schedule index of the first sparse step under option ``num_steps``: where the step clock, which counts
    runs of equal timesteps as the model receives them, reaches ``warmup``. Later than ``warmup`` where the
    schedule's dtype merges steps (HunyuanVideo 1.5's bfloat16: 8 for 5); its pipeline, which rainfusion finds
    on the stack, keeps ``warmup`` (``step_count.py``), so such a video's extrapolation is conservative."""
    reached = (clock_counts(schedule.reshape(-1)) >= warmup).nonzero()
    return int(reached[0]) if len(reached) else len(schedule)


@contextlib.contextmanager
def _compiled(
    model: torch.nn.Module,
    spec: dict | None,
    mode: str,
    num_steps: int,
    regional: tuple[str, ...] | None,
    rf_options: dict,
) -> Iterator[Callable]:
    """The model compiled as ``spec`` says (rainfusion: plus ``rf_options``): whole, or its ``regional`` block
    classes one by one (undone on exit)."""
    if spec is None:
        yield model
        return
    if spec["backend"] == "rainfusion":
        # The backend callable itself, so the benchmark runs without the package installed (no entry point).
        # The mode goes in as an option: torch.compile refuses mode= together with options=.
        options = {"num_steps": num_steps, "compile_mode": mode, **rf_options, **spec["options"]}
        kwargs = {"backend": rainfusion, "options": options}
    else:
        kwargs = {"backend": spec["backend"], "mode": None if mode == "default" else mode}
    if regional is None:
        yield torch.compile(model, **kwargs)
        return
    blocks = [module for module in model.modules() if type(module).__name__ in regional]
    for block in blocks:
        block.compile(**kwargs)
    try:
        yield model
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: the next variant starts uncompiled


def _call(model, preset, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One transformer call at timestep ``t`` as the pipeline makes it: ``t.expand(batch)``, the scheduler's dtype."""
    kwargs = {**preset.kwargs, "timestep": t.to(latent.device).expand(latent.shape[0])}
    return model(latent, *preset.args[1:], **kwargs)[0]


def _timed_call(model, preset, latent: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float]:
    _sync()
    start = time.perf_counter()
    out = _call(model, preset, latent, t)
    _sync()
    return out, (time.perf_counter() - start) * 1e3


def _attention_share(model, preset, latent: torch.Tensor, t: torch.Tensor) -> float:
    """Share of device (or CPU) kernel time spent in attention kernels during one step at ``t``."""
    cuda = torch.cuda.is_available()
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        _call(model, preset, latent, t)
        _sync()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, attr) for e in events)
    attention = sum(getattr(e, attr) for e in events if any(n in e.key.lower() for n in ATTENTION_KERNELS))
    return attention / total if total else math.nan


def _site_calls(model: torch.nn.Module) -> dict[str, float]:
    """What rainfusion's sites counted: calls dense and sparse (the warm-up as the device saw it), sparsity."""
    sites = [s for s in rf_compile.stats(model).values() if s["calls"]]
    sparsity = [s["sparsity"] for s in sites if s["sparsity"] is not None]
    return {
        "sites": len(sites),
        "dense_calls": sum(s["dense_calls"] for s in sites),
        "sparse_calls": sum(s["sparse_calls"] for s in sites),
        "sparsity": statistics.mean(sparsity) if sparsity else math.nan,
    }


def _fresh_start() -> None:
    """Forget compiled graphs, Dynamo's counters, rainfusion's sites and the peak memory: a variant starts clean."""
    torch._dynamo.reset()
    counters.clear()
    rf_compile.reset()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def run_variant(
    name: str,
    preset,
    schedule: torch.Tensor,
    steps: int,
    mode: str = "default",
    regional: tuple[str, ...] | None = None,
    profile: bool = True,
    rf_options: dict | None = None,
    dense_step: bool = True,
) -> dict:
    """Run variant ``name`` over its steps of ``schedule`` (see the module docstring); a record plus ``latent``.

    ``rf_options`` go to every rainfusion variant (the tiny size sets ``min_video_tokens=0, cost_model=False``).
    ``dense_step=False``: a sparse variant times no dense step (``dense_ms`` NaN: the caller takes inductor's).
    """
    spec = VARIANTS[name]
    sparse = is_sparse(spec)
    num_steps = len(schedule)
    warmup = first_sparse_step(schedule, RainFusionConfig(num_steps=num_steps).warmup_steps)
    dense_step = dense_step or not sparse
    # Schedule indices of the timed steps: the dense step, then sparse-phase ones.
    timed = [0] * dense_step + [*range(warmup + 1, warmup + 1 + steps)]
    clock = step_clock(preset.args[0].device)
    _fresh_start()
    latent = preset.args[0]
    with _compiled(preset.model, spec, mode, num_steps, regional, rf_options or {}) as model, torch.no_grad():
        _log(f"  {name} [{mode}]: first call at t={schedule[0].item():g}" + (" (compiles)" if spec else ""))
        _, compile_ms = _timed_call(model, preset, latent, schedule[0])
        if mode in CUDA_GRAPH_MODES and spec is not None:
            _call(model, preset, latent, schedule[0])  # CUDA graph trees record on a later call than the first
        frames_after_compile = counters["frames"]["ok"]
        times = []
        for i, index in enumerate(timed):
            if i == int(dense_step):  # past the dense step: the rest of the warm-up, then the sparse phase
                for t in schedule[1:warmup]:  # steps the run skips: the clock counts them as the pipeline would
                    clock.tick(t)
                if sparse:
                    _log(f"  {name}: first sparse call at t={schedule[warmup].item():g} (untimed: kernels compile)")
                    _call(model, preset, latent, schedule[warmup])
            out, ms = _timed_call(model, preset, latent, schedule[index])
            times.append(ms)
            phase = "dense" if index == 0 else "sparse" if sparse else "after the warm-up"
            _log(f"  {name}: step {index} (t={schedule[index].item():g}, {phase}) {ms:.1f} ms")
            t_next = schedule[timed[i + 1]].item() if i + 1 < len(timed) else 0.0
            # Euler, to the next timed step, of the channels the model predicts (HunyuanVideo 1.5's input also
            # holds condition latents and a mask after them).
            step = (t_next - schedule[index].item()) / 1000.0 * out
            latent = torch.cat([latent[:, : out.shape[1]] + step, latent[:, out.shape[1] :]], dim=1)
        recompiles = counters["frames"]["ok"] - frames_after_compile
        share = _attention_share(model, preset, latent, schedule[timed[-1] + 1]) if profile else math.nan
        calls = _site_calls(preset.model) if spec is not None and spec["backend"] == "rainfusion" else {}
    ms_per_step = statistics.median(times[int(dense_step):] if sparse else times)
    dense_ms = times[0] if dense_step else math.nan
    return {
        "variant": name,
        "mode": mode if spec is not None else "eager",
        "ms_per_step": ms_per_step,
        "dense_ms": dense_ms,
        "ms_steps": times,
        "timesteps": [schedule[i].item() for i in timed],
        "num_steps": num_steps,
        "warmup_steps": warmup,
        "video_s": video_seconds(ms_per_step, dense_ms, num_steps, warmup, sparse),
        "compile_s": compile_ms / 1e3 if spec is not None else 0.0,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else math.nan,
        "attention_share": share,
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles": recompiles,
        **calls,
        "latent": latent,
    }


def add_speedups(records: list[dict]) -> None:
    """Step and whole-video speed-ups against eager and inductor of the same group and mode (NaN without one)."""

    def find(record: dict, variant: str, mode: str | None = None) -> dict | None:
        for other in records:
            same = all(other.get(k) == record.get(k) for k in GROUP)
            if same and other["variant"] == variant and mode in (None, other["mode"]):
                return other
        return None

    for record in records:
        inductor_mode = "default" if record["mode"] == "eager" else record["mode"]
        for label, base in (("eager", find(record, "eager")), ("inductor", find(record, "inductor", inductor_mode))):
            step = base["ms_per_step"] / record["ms_per_step"] if base else math.nan
            video = base.get("video_s", math.nan) / record.get("video_s", math.nan) if base else math.nan
            record[f"speedup_vs_{label}"], record[f"video_speedup_vs_{label}"] = step, video


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(record: dict) -> str:
        mode = record.get("mode", "default")
        return record["variant"] if mode in ("default", "eager") else f"{record['variant']} [{mode}]"

    models = list(dict.fromkeys(f"{r['model']} ({r['layers']} blocks)" for r in records))
    variants = list(dict.fromkeys(label(r) for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(variants)
    for ax, key, ylabel in ((axes[0], "ms_per_step", "ms per step (median; sparse step where sparse)"),
                            (axes[1], "video_s", "s per video (extrapolated)")):  # fmt: skip
        for i, variant in enumerate(variants):
            by_model = {f"{r['model']} ({r['layers']} blocks)": r.get(key, 0) for r in records if label(r) == variant}
            values = [by_model.get(m, 0) for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=variant)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle("End to end, transformer only")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(records: list[dict], args, env: dict, out_dir: Path, dtype: torch.dtype) -> str:
    columns = [
        "model", "layers", "variant", "mode", "ms_per_step", "dense_ms", "video_s", "speedup_vs_eager",
        "speedup_vs_inductor", "video_speedup_vs_inductor", "sparsity", "attention_share", "compile_s", "peak_gib",
        "graph_breaks", "recompiles", "rel_err",
    ]  # fmt: skip
    add_speedups(records)
    table = markdown_table(records, columns)
    schedules = "\n".join(
        f"- {r['model']}, {r['layers']} blocks, {r.get('seq_len', '?')} tokens, batch {r['batch']}: {r['scheduler']}, "
        f"{r['num_steps']} steps, {r['warmup_steps']} dense; timed at t = {', '.join(f'{t:g}' for t in r['timesteps'])}"
        for r in {tuple(r.get(k) for k in GROUP): r for r in records if "scheduler" in r}.values()
    )
    skipped = env.get("skipped")
    markdown = (
        f"# End to end: compile vs eager\n\nenv: {env}\n\n{dtype}, transformer only, random weights. Per variant: one "
        f"timed dense (warm-up) step and {args.steps} timed steps after the warm-up, at the pipeline scheduler's "
        "timesteps; the skipped warm-up steps tick rainfusion's step clock, so it decides dense or sparse as in the "
        "pipeline. ms_per_step: median of the sparse steps (rainfusion v1/v1+/v2), of every timed step (the "
        "others); dense_ms: the warm-up step.\n\n**video_s is extrapolated, not measured**: warmup_steps x "
        "dense_ms + (num_steps - warmup_steps) x ms_per_step for rainfusion's sparse modes, num_steps x "
        "ms_per_step for the others. speedup_*: of a step; video_speedup_*: of a video. rel_err: final latent "
        "vs inductor's (or, without inductor in the run, the run's first variant's: rel_err_vs)."
        f"\n\n{schedules}\n\n{table}\n"
        + (f"\nSkipped (time budget): {', '.join(skipped)}\n" if skipped else "")
    )
    write_results(out_dir, args.name, env, records, markdown)
    if records:
        plot(records, out_dir / f"{args.name}.png")
    return table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quick", choices=list(CONFIGS),
                        help="quick: --layers blocks at the presets' grids; full: every block, usual resolution")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: the config's models")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--layers", type=int, help="quick only: transformer blocks per model (default 4)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up (default 2)")
    parser.add_argument("--num-steps", type=int, default=NUM_STEPS, help=f"the pipeline's steps (default {NUM_STEPS})")
    parser.add_argument("--modes", nargs="+", default=["default"], choices=COMPILE_MODES,
                        help="torch.compile modes to run every compiled variant under (default: default)")
    parser.add_argument("--regional", action="store_true", help="compile the repeated blocks, not the whole model")
    parser.add_argument("--budget-minutes", type=float, help="skip variants that would end past this")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step (no attention share)")
    parser.add_argument("--dense-from-inductor", action="store_true",
                        help="sparse variants time no dense step; their warm-up is priced at inductor's step")
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: CPU smoke run")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--name", default="e2e", help="file stem of the results (default e2e)")
    parser.add_argument("--append", action="store_true", help="keep the records of an existing json it does not redo")
    args = parser.parse_args()  # fmt: skip
    if args.config == "full" and args.layers is not None:
        parser.error("--layers cuts a model: it goes with --config quick, not full")
    args.layers = 4 if args.config == "quick" and args.layers is None else args.layers
    args.models = args.models or list(CONFIGS[args.config])
    warmup = RainFusionConfig(num_steps=args.num_steps).warmup_steps
    if args.steps < 1 or warmup + args.steps + 2 > args.num_steps:
        parser.error(f"--steps must be >= 1 with {warmup} warm-up steps + 1 untimed + --steps + 1 profiled "
                     f"<= --num-steps {args.num_steps}")  # fmt: skip
    return args


def set_rel_errs(records: list[dict], finals: dict[str, dict[str, torch.Tensor]]) -> None:
    """``rel_err`` of each record's final latent against inductor's in its mode (eager: the first mode's), or
    against the first variant run in that mode when inductor did not run (``rel_err_vs``); NaN for that one."""
    for record in records:
        by_variant = finals[record["final"]]
        reference = "inductor" if "inductor" in by_variant else next(iter(by_variant))
        latent, base = by_variant[record["variant"]], by_variant[reference]
        same = record["variant"] == reference
        record["rel_err"] = math.nan if same else ((latent - base).norm() / base.norm()).item()
        record["rel_err_vs"] = reference


# Compile times without cache hits between variants; a patch, so that a caller in the same process (the
# tests) gets its caches back when main returns.
@torch._inductor.config.patch(force_disable_caches=True)
def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    env = {**environment(), "config": args.config, "budget_minutes": args.budget_minutes, "skipped": []}
    out_dir = args.out or Path(__file__).parent / "results" / gpu_slug(env.get("gpu", "cpu"))
    old = []
    if args.append and (out_dir / f"{args.name}.json").exists():
        old = json.loads((out_dir / f"{args.name}.json").read_text())["records"]
    deadline = math.inf if args.budget_minutes is None else _START + args.budget_minutes * 60
    names = [name for name in VARIANTS if name in args.variants]  # inductor before the variants it is the base of
    new: list[dict] = []
    finals: dict[str, dict[str, torch.Tensor]] = {}  # "<model> <mode>" -> variant -> final latent (host)
    table = ""
    # Tiny grids are below the default 256 video tokens, and the cost model would keep them dense on a GPU.
    rf_options = {"min_video_tokens": 0, "cost_model": False} if args.size == "tiny" else {}

    def save() -> None:
        """Merge with the kept old records and write every file (after each variant: a cut-off run keeps it)."""
        nonlocal table
        set_rel_errs(new, finals)
        redone = {tuple(r.get(k) for k in KEY) for r in new}
        records = [r for r in old if tuple(r.get(k) for k in KEY) not in redone]
        records += [{k: v for k, v in r.items() if k != "final"} for r in new]
        if records or env["skipped"]:
            table = write(records, args, env, out_dir, dtype)

    for key in args.models:
        spec = MODELS[key]
        if time.perf_counter() > deadline:
            env["skipped"].append(f"{spec.name} (every variant)")
            save()
            continue
        grid = spec.full_latent if args.config == "full" and args.size == "full" else None
        layers = args.layers if args.config == "quick" else None
        _log(f"{spec.name}: building ({args.config} config, {args.size} size, {device})")
        preset = build_preset(spec.preset, args.size, batch=spec.batch, device=device, dtype=dtype, layers=layers,
                              latent=grid)
        preset.model.eval().requires_grad_(False)
        schedule = spec.schedule(args.num_steps, dtype)
        regional = tuple(getattr(preset.model, "_repeated_blocks", None) or spec.blocks) if args.regional else None
        (layout,) = preset.expected_layouts
        blocks = sum(type(m).__name__ in spec.blocks for m in preset.model.modules())
        group = {"model": spec.name, "layers": blocks, "seq_len": layout.seq_len, "regional": args.regional}
        longest = 0.0  # wall time of this model's longest variant so far: what the budget check expects next
        inductor_ms: dict[str, float] = {}  # per compile mode: inductor's step, for --dense-from-inductor
        for mode in args.modes:
            for name in names:
                if name == "eager" and mode != args.modes[0]:
                    continue  # eager has no compile mode: once per model
                if time.perf_counter() + longest > deadline:
                    env["skipped"].append(f"{spec.name} {name} [{mode}]")
                    _log(f"{spec.name} {name} [{mode}]: skipped, the time budget would not cover it")
                    save()
                    continue
                start = time.perf_counter()
                result = run_variant(name, preset, schedule, args.steps, mode, regional, not args.no_profile,
                                     rf_options, dense_step=not args.dense_from_inductor)  # fmt: skip
                if name == "inductor":
                    inductor_ms[mode] = result["ms_per_step"]
                if math.isnan(result["dense_ms"]):  # --dense-from-inductor: the warm-up at inductor's step
                    result["dense_ms"], result["dense_from"] = inductor_ms.get(mode, math.nan), "inductor"
                    result["video_s"] = video_seconds(result["ms_per_step"], result["dense_ms"], result["num_steps"],
                                                      result["warmup_steps"], sparse=True)  # fmt: skip
                longest = max(longest, time.perf_counter() - start)
                final = f"{key} {args.modes[0] if name == 'eager' else mode}"
                finals.setdefault(final, {})[name] = result.pop("latent").double().cpu()
                new.append({**group, "batch": spec.batch, "config": args.config, "scheduler": spec.scheduler,
                            **result, "final": final})  # fmt: skip
                _log(f"{spec.name} {name} [{mode}]: {result['ms_per_step']:.1f} ms per step, "
                     f"{result['video_s']:.1f} s per video (extrapolated), {time.perf_counter() - start:.0f} s wall")
                save()
        del preset
        if cuda:
            torch.cuda.empty_cache()
    print(table)


if __name__ == "__main__":
    main()
