"""rf_compile: RainFusion sparse attention for video diffusion transformers, as a torch.compile backend.

``torch.compile(model, backend="rainfusion")`` needs no import of this package; import it for
the inspection API (``inspect``, ``stats``, ``reset``) and the functional layer
(``classify_heads``, ``sparse_attention``).
"""

from __future__ import annotations

from typing import Any

import torch

from rf_compile.calibrate import calibrate, retarget
from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.ops.arm import classify_heads
from rf_compile.ops.attention import sparse_attention
from rf_compile.ops.runtime.stats import reset, stats
from rf_compile.plan import Pattern
from rf_compile.report import CompileReport, SiteReport

__version__ = "0.1.0"

__all__ = [
    "CompileReport",
    "Pattern",
    "RainFusionConfig",
    "SiteReport",
    "VideoLayout",
    "calibrate",
    "retarget",
    "classify_heads",
    "inspect",
    "reset",
    "sparse_attention",
    "stats",
]


def inspect(model: torch.nn.Module, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> CompileReport:
    """Compile ``model`` with the rainfusion backend, run one forward, and report every attention site.

    Returns the ``CompileReport`` of the graphs compiled by that forward. Dynamo's caches are
    reset first (``torch._dynamo.reset()``) so that the model is really recompiled: code compiled
    earlier for the same model class would otherwise be reused and report nothing.
    """
    from rf_compile.backend import compiled_graphs, rainfusion, reports_since

    torch._dynamo.reset()
    start = compiled_graphs()
    compiled = torch.compile(model, backend=rainfusion, options=options)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return CompileReport([site for report in reports_since(start) for site in report.sites], graph=start)
