"""The ``rainfusion`` Dynamo backend: parse options, run the passes, hand the graph to inductor.

Found by ``torch.compile(model, backend="rainfusion")`` through the ``torch_dynamo_backends``
entry point, without importing rf_compile.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rf_compile.config import OptionError, RainFusionConfig
from rf_compile.passes.assign_layout import assign_layouts
from rf_compile.passes.context import PassContext
from rf_compile.passes.find_attention import find_attention
from rf_compile.passes.rewrite import rewrite_sites
from rf_compile.report import CompileReport

log = logging.getLogger(__name__)

PASSES = (find_attention, assign_layouts, rewrite_sites)

# Reports of the graphs compiled in this process, newest last (``rf_compile.inspect`` reads them);
# bounded, so a long-running server that recompiles does not grow without end.
REPORTS: collections.deque[CompileReport] = collections.deque(maxlen=256)
_GRAPHS_COMPILED = 0


def reports_since(graph_index: int) -> list[CompileReport]:
    """Reports of the graphs compiled since ``graph_index`` (``compiled_graphs()`` taken earlier)."""
    return [report for report in REPORTS if report.graph >= graph_index]


def compiled_graphs() -> int:
    """How many graphs the backend has compiled in this process."""
    return _GRAPHS_COMPILED


def apply_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    """Run ``PASSES`` over ``gm``. A pass that fails (other than an ``OptionError``: the user's options
    are wrong) leaves the remaining sites dense with the error as their reason, unless ``strict``."""
    for run_pass in PASSES:
        try:
            run_pass(gm, ctx)
        except OptionError:
            raise
        except Exception as error:  # a failing pass must not break the user's model
            if ctx.config.strict:
                raise
            log.warning("rainfusion pass %s failed (%s); remaining sites stay dense", run_pass.__name__, error)
            for site in ctx.sites:
                if site.report.status != "sparse":
                    site.make_dense(f"pass {run_pass.__name__} failed: {error}")
            return


def rainfusion(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable:
    """Dynamo backend: RainFusion passes over ``gm``, then ``compile_fx`` with the remaining options
    (or, with ``compiler="eager"``, the rewritten graph as it is)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    global _GRAPHS_COMPILED
    config, inductor_options = RainFusionConfig.from_options(options)
    ctx = PassContext(gm=gm, config=config, graph_index=_GRAPHS_COMPILED)
    _GRAPHS_COMPILED += 1
    apply_passes(gm, ctx)
    report = CompileReport(ctx.reports, graph=ctx.graph_index)
    REPORTS.append(report)
    if config.report:
        print(report.table())
    if config.compiler == "eager":  # torch.compile refuses mode= with options=, so no inductor mode is lost
        return gm.forward
    mode = mode or config.compile_mode
    patches = {**(list_mode_options(mode) if mode and mode != "default" else {}), **inductor_options}
    return compile_fx(gm, example_inputs, config_patches=patches or None)
