"""Calibration profiles: per-head block densities measured on one model, applied by ``options={"profile": path}``.

A profile is data (JSON, ``SCHEMA``): the model class, the v2 settings it was measured with, and per
site its layout, head count, the chosen block density of every head and the errors measured for them
(``rf_compile.calibrate`` writes it). Applying it checks every site it is asked for against the call:
a site it does not hold, a layout or head count it was not measured at, or other v2 settings are refused
with an error that names the first mismatch; a profile never silently applies to another model.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout

SCHEMA = 1
# v2 settings that change what a measured density means: a profile is applied only with the same ones.
MEASURED_WITH = ("order", "tile", "sink_frames", "select", "mass")


class ProfileError(ValueError):
    """A calibration profile that does not match the model, site or options it is applied to."""


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime: float) -> dict:
    try:
        with open(path) as f:
            profile = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ProfileError(f"calibration profile {path!r} cannot be read: {error}") from None
    if profile.get("schema") != SCHEMA or not isinstance(profile.get("sites"), dict):
        raise ProfileError(f"{path!r} is not a calibration profile of schema {SCHEMA} (see rf_compile.calibrate)")
    return profile


def load(path: str) -> dict:
    """The profile at ``path`` (re-read when the file changes)."""
    return _read(path, os.path.getmtime(path) if os.path.exists(path) else 0.0)


def settings_of(config: RainFusionConfig) -> dict:
    """The v2 settings a profile records and must be applied with (JSON values; the order as resolved, so an
    unset ``order`` reads as the ``"tiles"`` that profiles recorded before it could be unset)."""
    settings = {key: (list(v) if isinstance(v := getattr(config, key), tuple) else v) for key in MEASURED_WITH}
    return {**settings, "order": config.block_order}


@functools.lru_cache(maxsize=1024)
def _densities(path: str, mtime: float, site: str, layout: VideoLayout, heads: int, config: RainFusionConfig):
    profile = _read(path, mtime)
    where = f"calibration profile {path!r} (measured on {profile.get('model', '?')})"
    entry = profile["sites"].get(site)
    if entry is None:
        known = ", ".join(sorted(profile["sites"])[:4])
        raise ProfileError(f"{where} has no site {site!r} (its sites: {known}, ...): calibrate this model")
    if entry["layout"] != layout.describe():
        raise ProfileError(
            f"{where}: site {site!r} was measured at layout {entry['layout']}, this call has {layout.describe()}: "
            "calibrate at this resolution"
        )
    if entry["heads"] != heads or len(entry["density"]) != heads:
        raise ProfileError(f"{where}: site {site!r} was measured with {entry['heads']} heads, this call has {heads}")
    ours, theirs = settings_of(config), profile.get("settings", {})
    for key in MEASURED_WITH:
        if theirs.get(key) != ours[key]:
            raise ProfileError(f"{where} was measured with {key}={theirs.get(key)!r}, this site has {ours[key]!r}")
    return tuple(float(d) for d in entry["density"])


def head_densities(config: RainFusionConfig, site: str, layout: VideoLayout, heads: int, device) -> torch.Tensor:
    """float32 [heads]: the block density of each head of ``site`` at ``layout`` from ``config.profile``.

    Called once per (site, layout, batch size), where the op builds its state (outside CUDA-graph pools)."""
    path = config.profile
    mtime = os.path.getmtime(path) if os.path.exists(path) else 0.0
    return torch.tensor(_densities(path, mtime, site, layout, heads, config), dtype=torch.float32, device=device)
