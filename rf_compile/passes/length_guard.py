"""Symbolic sites too short to be sparse at any layout keep SDPA, under a guard on their length.

A graph compiled with dynamic shapes serves every length its guards admit, so what the pass decides at
the compile-time example (the hint) must hold for all of them. Below a floor no layout can be sparse:
``min_video_tokens`` (a site's video tokens are at most its length) and the cost model's
``sparse_floor``. Where the hint is below it, the site keeps its SDPA and the graph gets the guard
"length < floor"; a longer call fails it and compiles again, and that graph gets "length >= floor" and
the op, which decides per call shape. Each graph then serves one side: short steps run inductor's own
graph, with no op to decide dense at every call (host time a short step shows), and no longer call
loses its sparsity to a short first call.

Where the batch is symbolic too (``dynamic=True`` makes CFG's batch of 2 so), the cost floor depends on
it: dense grows as batch x length^2 and a sparse call's fixed cost does not shrink with the batch, so the
guard is on that product (``cost.sparse_work_floor``). A size that cannot take a guard (data-dependent, or
a range the user fixed with ``mark_dynamic``, which a narrower guard would violate) is left to the op, which
decides per call as before; so is the cost floor where the head count or head dim is symbolic.
"""

from __future__ import annotations

import math

import torch
from torch._guards import TracingContext
from torch.fx.experimental.symbolic_shapes import StrictMinMaxConstraint, free_unbacked_symbols, statically_known_true

from rf_compile.config import RainFusionConfig
from rf_compile.ops import cost


def short_site_reason(config: RainFusionConfig, q: torch.Tensor, kernel: str) -> str | None:
    """Why the symbolic site of query ``q`` (B, H, N, D) keeps SDPA in this graph, or None. A reason means
    the graph now holds the guard ``N < floor`` (a symbolic batch: ``B N^2 < floor``); None with floors above
    zero and guardable sizes means it holds the opposite ones."""
    B, H, N, D = q.shape
    least = config.min_video_tokens
    floors = [(least, f"fewer video tokens than min_video_tokens={least} at any layout")]
    static = all(isinstance(size, int) for size in (H, D))  # a symbolic head count or dim: the op prices it
    if static and isinstance(B, int):
        floors.append(cost.sparse_floor(config, B, H, D, q.device, kernel) or (0, ""))
    floor, why = max(floors)
    if floor > 0 and _below(N, floor):
        return f"{why}; this graph is guarded to calls shorter than {floor:,} tokens (a longer one compiles again)"
    work = cost.sparse_work_floor(config, H, D, q.device, kernel) if static and not isinstance(B, int) else None
    if work is None or not _below(B * N * N, work[0]):
        return None
    return f"{work[1]}; this graph is guarded to calls with batch x tokens^2 under {work[0]:,}{_at_hint(B, work[0])}"


def _at_hint(batch: torch.SymInt, work: int) -> str:
    """The work floor in tokens at the compile-time batch, for the report."""
    hint = batch.node.hint
    if hint is None:  # (data-dependent: no example value)
        return " (a larger call compiles again)"
    tokens = math.isqrt((work - 1) // int(hint)) + 1  # the least N with hint x N^2 >= work
    return f" (at batch {int(hint)}: {tokens:,} tokens; a larger call compiles again)"


def _below(length: torch.SymInt | int, floor: int) -> bool:
    """Whether ``length`` (a size, or a product of sizes) ``< floor``, guarded where the shape environment
    cannot tell from its ranges alone."""
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
