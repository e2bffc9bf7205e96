"""The public ``stats()`` and ``reset()`` (``rf_compile.stats`` / ``rf_compile.reset``)."""

from __future__ import annotations

import torch

from rf_compile.ops.runtime.clock import reset_clocks
from rf_compile.ops.runtime.models import all_models


def stats(model: torch.nn.Module | None = None) -> dict[str, dict]:
    """Per site: calls, dense/sparse calls, ARM runs, measured sparsity and per-head pattern counts.

    Without ``model``: every site of every model, keyed ``"<Model>#<n>/<site>"``. With ``model``
    (the module you compiled, or the compiled one): that model's sites, keyed by site name.
    Reading the device counters synchronises with the device: call it between steps, not inside.
    """
    if model is not None:
        target = getattr(model, "_orig_mod", model)
        for state in all_models():
            module = state.module() if state.module is not None else None
            if module is not None and getattr(module, "_orig_mod", module) is target:
                return state.summaries()
        return {}
    return {
        (f"{state.name}/{name}" if state.name else name): summary
        for state in all_models()
        for name, summary in state.summaries().items()
    }


def reset() -> None:
    """Zero every call counter and statistic, and restart the step clocks (in place: CUDA graphs keep them)."""
    reset_clocks()
    for state in all_models():
        for site in state.sites.values():
            site.reset()
