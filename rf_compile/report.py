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

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["layout"] = dataclasses.asdict(self.layout) if self.layout else None
        return data


@dataclasses.dataclass
class CompileReport:
    """Every site of every graph the backend compiled during one ``inspect`` (or one compile)."""

    sites: list[SiteReport] = dataclasses.field(default_factory=list)

    @property
    def sparse(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "sparse"]

    @property
    def dense(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status != "sparse"]

    def table(self, tablefmt: str = "simple") -> str:
        """The site table (tabulate)."""
        rows = [
            [
                s.name,
                s.seq_len if s.kv_len in (None, s.seq_len) else f"{s.seq_len}->{s.kv_len}",
                f"{s.heads}x{s.head_dim}" if s.heads else "",
                s.layout.describe() if s.layout else "",
                s.status + (f" ({s.kernel})" if s.kernel and s.status == "sparse" else ""),
                s.reason,
                s.source,
            ]
            for s in self.sites
        ]
        headers = ["site", "seq", "heads x dim", "layout", "status", "reason", "source"]
        summary = f"{len(self.sparse)} sparse, {len(self.dense)} dense attention sites"
        return tabulate(rows, headers=headers, tablefmt=tablefmt) + "\n" + summary

    def to_json(self) -> str:
        return json.dumps({"sites": [s.to_dict() for s in self.sites]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> CompileReport:
        sites = []
        for data in json.loads(text)["sites"]:
            layout = VideoLayout(**data.pop("layout")) if data.get("layout") else None
            data.pop("layout", None)
            sites.append(SiteReport(layout=layout, **data))
        return cls(sites)

    def __str__(self) -> str:
        return self.table()
