"""Symbolic sites too short to be sparse at any layout keep SDPA, under a guard on their length.

A graph compiled with dynamic shapes serves every length its guards admit, so what the pass decides at
the compile-time example (the hint) must hold for all of them. Below a floor no layout can be sparse:
``min_video_tokens`` (a site's video tokens are at most its length) and the cost model's
``sparse_floor``. Where the hint is below it, the site keeps its SDPA and the graph gets the guard
"length < floor"; a longer call fails it and compiles again, and that graph gets "length >= floor" and
the op, which decides per call shape. Each graph then serves one side: short steps run inductor's own
graph, with no op to decide dense at every call (host time a short step shows), and no longer call
loses its sparsity to a short first call.

A length that cannot take a guard (data-dependent, or a range the user fixed with ``mark_dynamic``,
which a narrower guard would violate) is left to the op, which decides per call as before; so is the
cost floor where the batch is symbolic (``dynamic=True``), as the floor depends on it.
"""

from __future__ import annotations

import torch
from torch._guards import TracingContext
from torch.fx.experimental.symbolic_shapes import StrictMinMaxConstraint, free_unbacked_symbols, statically_known_true

from rf_compile.config import RainFusionConfig
from rf_compile.ops import cost


def short_site_reason(config: RainFusionConfig, q: torch.Tensor, kernel: str) -> str | None:
    """Why the symbolic site of query ``q`` (B, H, N, D) keeps SDPA in this graph, or None. A reason means
    the graph now holds the guard ``N < floor``; None with a floor above zero and a guardable ``N`` means it
    holds ``N >= floor``."""
    B, H, N, D = q.shape
    least = config.min_video_tokens
    floors = [(least, f"fewer video tokens than min_video_tokens={least} at any layout")]
    if all(isinstance(size, int) for size in (B, H, D)):  # a symbolic batch or head count: the op prices it
        floors.append(cost.sparse_floor(config, B, H, D, q.device, kernel) or (0, ""))
    floor, why = max(floors)
    if floor <= 0 or not _below(N, floor):
        return None
    return f"{why}; this graph is guarded to calls shorter than {floor:,} tokens (a longer one compiles again)"


def _below(length: torch.SymInt | int, floor: int) -> bool:
    """Whether ``length < floor``, guarded where the shape environment cannot tell from its ranges alone."""
    if statically_known_true(length < floor):
        return True
    if statically_known_true(length >= floor) or not _guardable(length):
        return False
    return bool(length < floor)  # evaluated at the hint, recorded as a guard of the graph either way


def _guardable(length: torch.SymInt) -> bool:
    """Backed sizes of a graph Dynamo is compiling, where no input has a range the user fixed: a range from
    ``mark_dynamic(min=, max=)`` is a strict constraint, which a guard narrowing it fails at the end of the
    compile."""
    context = TracingContext.try_get()
    if context is None or free_unbacked_symbols(length):  # (no Dynamo frame: nothing would hold the guard)
        return False
    constraints = (getattr(symbolic, "constraint_sizes", None) or () for symbolic in context.tensor_to_context.values())
    return not any(isinstance(constraint, StrictMinMaxConstraint) for sizes in constraints for constraint in sizes)
