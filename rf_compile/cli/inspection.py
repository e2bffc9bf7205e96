"""What ``rf-inspect`` captured and measured: the records its outputs (table, JSON, plot, graph) read.

Its own module so that the outputs (``plot``, ``graph_export``) import it, not the command.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rf_compile.passes.context import Site
from rf_compile.report import CompileReport


@dataclasses.dataclass
class Target:
    """What to inspect: a model, its forward inputs, and (for a preset) what it should contain."""

    label: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    preset: Any = None  # rf_compile.presets.Preset


@dataclasses.dataclass
class Captured:
    """One Dynamo graph after the rainfusion passes, with the sites they found."""

    gm: torch.fx.GraphModule
    sites: list[Site]


@dataclasses.dataclass
class Inspection:
    """The result of one ``rf-inspect`` call."""

    target: Target
    options: dict[str, Any]
    graphs: list[Captured]
    stats: dict[str, dict] | None = None  # per site name, from rf_compile.stats(), with --run
    steps: int = 0
    capture_seconds: float = 0.0

    @property
    def report(self) -> CompileReport:
        return CompileReport([site.report for graph in self.graphs for site in graph.sites])


def timesteps(steps: int) -> list[float]:
    """Descending denoising timesteps, 999 -> 0, as the pipelines' linear schedules."""
    return torch.linspace(999, 0, steps).tolist()
