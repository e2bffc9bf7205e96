"""What the compiler pass decided for each attention site, and why: for people and for tests."""

from __future__ import annotations

import dataclasses
import json

from tabulate import tabulate

from rf_compile.layout import VideoLayout


@dataclasses.dataclass
class SiteReport:
    """One ``scaled_dot_product_attention`` call found in a captured graph.

    ``status`` is ``"sparse"`` (rewritten to RainFusion) or ``"dense"`` (left as SDPA, or
    rewritten in ``mode="dense"``); ``reason`` says why a site is dense, for a person.
    ``key`` names a rewritten site in ``rf_compile.stats()``.
    """

    name: str
    module: str
    status: str = "dense"
    reason: str = ""
    layout: VideoLayout | None = None
    heads: int | None = None
    head_dim: int | None = None
    seq_len: int | None = None
    kv_len: int | None = None
    kernel: str | None = None
    source: str = ""
    graph: int = 0
    key: str | None = None
    symbolic: bool = False  # sizes are symbolic: the layout is found again for each call shape
    layout_source: str = ""  # where the layout came from: "graph", "option", "calling model", ...

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["layout"] = dataclasses.asdict(self.layout) if self.layout else None
        return data

    def cells(self) -> dict[str, object]:
        """The site's columns as a person reads them (the site table's and rf-inspect's)."""
        return {
            "site": self.name,
            "module": self.module,
            "seq": self.seq_len if self.kv_len in (None, self.seq_len) else f"{self.seq_len}->{self.kv_len}",
            "heads x dim": f"{self.heads}x{self.head_dim}" if self.heads else "",
            "layout": self.layout.describe() if self.layout else "",
            "status": self.status + (f" ({self.kernel})" if self.kernel and self.status == "sparse" else ""),
            "reason": self.reason,
            "source": self.source,
        }


@dataclasses.dataclass
class CompileReport:
    """Every site of every graph the backend compiled during one ``inspect`` (or one compile)."""

    sites: list[SiteReport] = dataclasses.field(default_factory=list)
    graph: int = 0  # index of the (first) graph it reports, in compile order within the process

    @property
    def sparse(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "sparse"]

    @property
    def dense(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status != "sparse"]

    def table(self, tablefmt: str = "simple") -> str:
        """The site table (tabulate)."""
        headers = ["site", "seq", "heads x dim", "layout", "status", "reason", "source"]
        rows = [[site.cells()[h] for h in headers] for site in self.sites]
        summary = f"{len(self.sparse)} sparse, {len(self.dense)} dense attention sites"
        return tabulate(rows, headers=headers, tablefmt=tablefmt) + "\n" + summary

    def to_json(self) -> str:
        return json.dumps({"graph": self.graph, "sites": [s.to_dict() for s in self.sites]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> CompileReport:
        sites, document = [], json.loads(text)
        for data in document["sites"]:
            layout = VideoLayout(**data.pop("layout")) if data.get("layout") else None
            data.pop("layout", None)
            sites.append(SiteReport(layout=layout, **data))
        return cls(sites, graph=document.get("graph", 0))

    def __str__(self) -> str:
        return self.table()
