"""``rf_compile.calibrate``: measure on the user's own model and inputs how sparse each head can be.

Peers tune sparse attention per model for hours (per-layer searches, mask searches). Here the user's
own denoising loop runs once with ``mode="calibrate"``: every attention site returns dense attention
(the trajectory stays the dense one) and, on the sparse steps, measures on the device the relative L2
error of v2 plans at each candidate block density against that dense output, per head, from the same
q/k/v. Each head then takes the smallest density whose mean error is within ``target`` (dense where
none is), or, with a ``density`` budget instead, the densities of least summed squared error at that
mean density. The result is a profile (``ops.profile``) that ``options={"mode": "v2", "profile": path}``
applies; it is refused on any other model, site, layout or v2 setting. A profile keeps every head's
measured errors, so ``retarget`` picks another target or budget from it in milliseconds, without a run.
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
    target: float | None = 0.05,
    density: float | None = None,
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
    density:
        Instead of ``target``: the mean block density of the profile, in (0, 1]; each head takes the
        candidate (or dense) that minimises the summed squared error of all heads at that cost.
    out:
        Where to write the profile JSON (optional).
    options:
        Backend options the profile will be applied with (``order``, ``tile``, ``sink_frames``, ``select``,
        ``mass``, ``candidates``, ``num_steps``, ``dense_warmup`` ...); ``mode`` is set here.
    progress:
        Show a progress bar over the model's forward calls and print a summary table.
    """
    target = _check_goal(target, density)
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
    profile = choose(stats(model), config, target, density)
    profile.update(model=type(model).__name__, seconds=round(time.perf_counter() - start, 1))
    if not profile["sites"]:
        raise RuntimeError("calibration measured no sparse call of a video self-attention site: did the run reach "
                           "the sparse steps (after the dense warm-up of num_steps)?")  # fmt: skip
    if out is not None:
        Path(out).write_text(json.dumps(profile, indent=1))
    if progress:
        print(summary(profile))
    return profile


def choose(
    site_stats: dict[str, dict], config: RainFusionConfig, target: float | None, density: float | None = None
) -> dict:
    """The profile from ``stats(model)`` after a ``mode="calibrate"`` run (see ``calibrate`` for the two goals)."""
    measured = {}
    for name, entry in site_stats.items():
        heads = [h.get("candidate_errors") for h in entry.get("heads", [])]
        if not heads or any(h is None for h in heads) or len(entry.get("by_layout", {})) != 1:
            continue  # never sparse here, or measured at several layouts (a profile holds one per site)
        measured[name] = dict(layout=entry["layout"], candidate_errors=heads, sparse_calls=entry["sparse_calls"])
    return _profile(measured, list(config.candidates), settings_of(config), target, density)


def retarget(profile: dict | str | Path, target: float | None = None, density: float | None = None) -> dict:
    """The same calibration at another error ``target`` or mean ``density`` (exactly one), from the errors
    the profile (a dict or a JSON path) keeps: no model run."""
    if not isinstance(profile, dict):
        profile = json.loads(Path(profile).read_text())
    if profile.get("schema") != SCHEMA:
        raise ValueError(f"not a calibration profile of schema {SCHEMA} (see rf_compile.calibrate)")
    target = _check_goal(target, density)
    measured = {
        name: {key: site[key] for key in ("layout", "candidate_errors", "sparse_calls")}
        for name, site in profile["sites"].items()
    }
    chosen = _profile(measured, profile["candidates"], profile["settings"], target, density)
    chosen.update(model=profile.get("model"), seconds=profile.get("seconds"))
    return chosen


def _check_goal(target: float | None, density: float | None) -> float | None:
    """Exactly one of ``target`` (an error in (0, 1)) and ``density`` (in (0, 1]); returns the target."""
    if density is not None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be a mean block density in (0, 1], got {density!r}")
        return None
    if target is None or not 0.0 < target < 1.0:
        raise ValueError(f"target must be a relative error in (0, 1) (or give density=...), got {target!r}")
    return target


def _profile(measured: dict, candidates: list[float], settings: dict, target: float | None, density: float | None):
    errors = [head for site in measured.values() for head in site["candidate_errors"]]
    if density is None:
        order = sorted(range(len(candidates)), key=candidates.__getitem__)
        picks = []
        for head in errors:
            ok = [i for i in order if head[i] <= target]
            picks.append((candidates[ok[0]], head[ok[0]]) if ok else (1.0, 0.0))
    else:
        picks = allocate(errors, candidates, density)
    sites, start = {}, 0
    for name, site in measured.items():
        heads = len(site["candidate_errors"])
        chosen, start = picks[start : start + heads], start + heads
        sites[name] = dict(layout=site["layout"], heads=heads, density=[d for d, _ in chosen],
                           error=[e for _, e in chosen], candidate_errors=site["candidate_errors"],
                           sparse_calls=site["sparse_calls"])  # fmt: skip
    densities = [d for d, _ in picks]
    return dict(
        schema=SCHEMA,
        target=target,
        density=density,
        candidates=candidates,
        settings=settings,
        mean_density=sum(densities) / len(densities) if densities else None,
        sites=sites,
    )


def allocate(errors: list[list[float]], candidates: list[float], density: float) -> list[tuple[float, float]]:
    """Per head (its error at each candidate) the (density, error) that minimise the summed squared error
    of all heads with their mean density at most ``density``; dense (1.0, error 0) is always a choice.

    The Lagrangian relaxation: for a price ``lam`` of density each head takes ``argmin e^2 + lam * d``,
    whose mean density falls as ``lam`` rises; the smallest price that meets the budget is found by
    bisection. Its choices are optimal for the cost they reach (at most ``density``; the points of each
    head's lower convex hull only).
    """
    options = [sorted([(1.0, 0.0), *zip(candidates, head)]) for head in errors]
    lowest = sum(o[0][0] for o in options) / max(len(options), 1)
    if lowest > density + 1e-12:
        raise ValueError(f"density {density} is below the smallest candidate mix ({lowest:.3f}); "
                         f"accepted: {lowest:.3f} to 1 (add smaller candidates to go lower)")  # fmt: skip

    def pick(lam: float) -> list[tuple[float, float]]:
        return [min(o, key=lambda c: (c[1] ** 2 + lam * c[0], c[0])) for o in options]

    def mean(chosen: list[tuple[float, float]]) -> float:
        return sum(d for d, _ in chosen) / max(len(chosen), 1)

    low, high = 0.0, 1.0
    while mean(pick(high)) > density + 1e-12:
        high *= 4.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if mean(pick(middle)) > density + 1e-12 else (low, middle)
    return pick(high)


def summary(profile: dict) -> str:
    """A table of the profile: per site its layout, heads' densities and errors."""
    from tabulate import tabulate

    rows = [
        (name, site["layout"], " ".join(f"{d:.2f}" for d in site["density"]), f"{max(site['error']):.3f}")
        for name, site in profile["sites"].items()
    ]
    mean = profile["mean_density"]
    goal = f"error <= {profile['target']}" if profile.get("target") is not None else f"density {profile['density']}"
    head = f"calibration of {profile['model']} to {goal} in {profile['seconds']} s"
    tail = f"mean block density {mean:.3f} (block sparsity {1 - mean:.3f} on sparse steps)" if mean else ""
    return "\n".join([head, tabulate(rows, ["site", "layout", "head densities", "worst error"]), tail])


def _progress_bar(compiled: torch.nn.Module, total: int | None):
    """A tqdm bar over the compiled model's forward calls (a pre-hook outside the compiled code); (handle, bar)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="calibrating", unit="call")

    def tick(*_: Any) -> None:  # a pre-hook's return value would replace the inputs
        bar.update(1)

    return compiled.register_forward_pre_hook(tick), bar
