"""``rf_compile.calibrate``: measure on the user's own model and inputs how sparse each head can be.

Peers tune sparse attention per model for hours (per-layer searches, mask searches). Here the user's
own denoising loop runs once with ``mode="calibrate"``: every attention site returns dense attention
(the trajectory stays the dense one) and, on the sparse steps, measures on the device the relative L2
error of v2 plans at each candidate block density against that dense output, per head, from the same
q/k/v. Each head then takes the smallest density whose mean error is within ``target`` (dense where
none is). The result is a profile (``ops.profile``) that ``options={"mode": "v2", "profile": path}``
applies; it is refused on any other model, site, layout or v2 setting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rf_compile.config import RainFusionConfig
from rf_compile.ops.profile import SCHEMA, settings_of
from rf_compile.ops.runtime.stats import reset, stats


def calibrate(
    model: torch.nn.Module,
    *args: Any,
    run: Callable[[torch.nn.Module], Any] | None = None,
    steps: int = 8,
    target: float = 0.05,
    out: str | Path | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> dict:
    """Calibrate per-head v2 block densities of ``model`` to an attention error ``target``; returns the profile.

    Parameters
    ----------
    model:
        The (uncompiled) transformer. It is compiled here with ``mode="calibrate"``.
    *args, **kwargs:
        Without ``run``: one forward's inputs, called at ``steps`` timesteps from ``kwargs["timestep"]``
        down to a tenth of it (all sparse steps: the warm-up is off).
    run:
        Instead, a function that runs your own sampling loop with the model it is given (for example
        ``lambda m: pipeline_with(m)(prompt, num_inference_steps=30)``); the warm-up and step count come from
        ``options`` as they will at inference, and the sparse steps are measured.
    steps:
        Timesteps of the sweep without ``run``.
    target:
        Largest mean relative L2 error of a head's attention output against dense, in (0, 1).
    out:
        Where to write the profile JSON (optional).
    options:
        Backend options the profile will be applied with (``order``, ``tile``, ``sink_frames``, ``select``,
        ``mass``, ``candidates``, ``num_steps``, ``dense_warmup`` ...); ``mode`` is set here.
    progress:
        Show a progress bar over the model's forward calls and print a summary table.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be a relative error in (0, 1), got {target!r}")
    options = {**(options or {}), "mode": "calibrate"}
    if run is None:
        if "timestep" not in kwargs:
            raise ValueError("calibrate needs run=..., or the model's inputs with a timestep=... keyword to sweep")
        options.setdefault("dense_warmup", 0.0)
        options.setdefault("num_steps", steps)
    config, _ = RainFusionConfig.from_options(options)
    start = time.perf_counter()
    torch._dynamo.reset()
    reset()
    compiled = torch.compile(model, backend="rainfusion", options=options)
    bar = _progress_bar(compiled, steps if run is None else None) if progress else None
    try:
        with torch.no_grad():
            if run is not None:
                run(compiled)
            else:
                first = kwargs.pop("timestep")
                for i in range(steps):
                    compiled(*args, timestep=first * (1.0 - 0.9 * i / max(steps - 1, 1)), **kwargs)
    finally:
        if bar is not None:
            bar[0].remove()
            bar[1].close()
    profile = choose(stats(model), config, target)
    profile.update(model=type(model).__name__, seconds=round(time.perf_counter() - start, 1))
    if not profile["sites"]:
        raise RuntimeError("calibration measured no sparse call of a video self-attention site: did the run reach "
                           "the sparse steps (after the dense warm-up of num_steps)?")  # fmt: skip
    if out is not None:
        Path(out).write_text(json.dumps(profile, indent=1))
    if progress:
        print(summary(profile))
    return profile


def choose(site_stats: dict[str, dict], config: RainFusionConfig, target: float) -> dict:
    """The profile from ``stats(model)`` after a ``mode="calibrate"`` run: per head the smallest candidate
    density whose mean error is within ``target``, else 1.0 (dense)."""
    candidates = list(config.candidates)
    order = sorted(range(len(candidates)), key=candidates.__getitem__)
    sites = {}
    for name, entry in site_stats.items():
        heads = [h.get("candidate_errors") for h in entry.get("heads", [])]
        if not heads or any(h is None for h in heads) or len(entry.get("by_layout", {})) != 1:
            continue  # never sparse here, or measured at several layouts (a profile holds one per site)
        density, error = [], []
        for errors in heads:
            ok = [i for i in order if errors[i] <= target]
            density.append(candidates[ok[0]] if ok else 1.0)
            error.append(errors[ok[0]] if ok else 0.0)
        sites[name] = dict(layout=entry["layout"], heads=len(heads), density=density, error=error,
                           candidate_errors=heads, sparse_calls=entry["sparse_calls"])  # fmt: skip
    densities = [d for site in sites.values() for d in site["density"]]
    return dict(
        schema=SCHEMA,
        target=target,
        candidates=candidates,
        settings=settings_of(config),
        mean_density=sum(densities) / len(densities) if densities else None,
        sites=sites,
    )


def summary(profile: dict) -> str:
    """A table of the profile: per site its layout, heads' densities and errors."""
    from tabulate import tabulate

    rows = [
        (name, site["layout"], " ".join(f"{d:.2f}" for d in site["density"]), f"{max(site['error']):.3f}")
        for name, site in profile["sites"].items()
    ]
    mean = profile["mean_density"]
    head = f"calibration of {profile['model']} to error <= {profile['target']} in {profile['seconds']} s"
    tail = f"mean block density {mean:.3f} (block sparsity {1 - mean:.3f} on sparse steps)" if mean else ""
    return "\n".join([head, tabulate(rows, ["site", "layout", "head densities", "worst error"]), tail])


def _progress_bar(compiled: torch.nn.Module, total: int | None):
    """A tqdm bar over the compiled model's forward calls (a pre-hook outside the compiled code); (handle, bar)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="calibrating", unit="call")

    def tick(*_: Any) -> None:  # a pre-hook's return value would replace the inputs
        bar.update(1)

    return compiled.register_forward_pre_hook(tick), bar
