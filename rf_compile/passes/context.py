"""State shared by the passes of one backend call: the graph, the config, the sites found."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx

from rf_compile.config import RainFusionConfig
from rf_compile.ops.runtime.sites import LayoutResolver
from rf_compile.report import SiteReport


@dataclasses.dataclass
class Site:
    """An SDPA call and what the passes learn about it."""

    node: torch.fx.Node
    args: dict[str, Any]  # query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    report: SiteReport
    # An outer-product mask: (row factor, key factor) nodes, each broadcastable to the mask.
    mask_factors: tuple[torch.fx.Node, torch.fx.Node] | None = None
    # Symbolic or regional sites: finds the layout of each call shape at run time.
    resolver: LayoutResolver | None = None

    def make_dense(self, reason: str) -> None:
        if self.report.status != "dense" or not self.report.reason:
            self.report.status, self.report.reason = "dense", reason

    @property
    def eligible(self) -> bool:
        """Still a candidate for rewriting (no pass has given a reason to keep it dense)."""
        return not self.report.reason


@dataclasses.dataclass
class PassContext:
    gm: torch.fx.GraphModule
    config: RainFusionConfig
    graph_index: int = 0
    sites: list[Site] = dataclasses.field(default_factory=list)
    symbols: list = dataclasses.field(default_factory=list)  # the graph's size symbols (dynamic shapes)

    @property
    def reports(self) -> list[SiteReport]:
        return [site.report for site in self.sites]
