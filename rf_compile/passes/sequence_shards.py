"""Context parallelism in the layout pass: sequence shards, and the all-to-all that joins them.

Under Ulysses attention each rank holds an equal chunk of the sequence (a ``Piece`` of the whole
dimension); an all-to-all swaps it for all tokens of some heads (dimension 0 of the exchanged
tensor becomes ``Ranks``), and flattening (ranks, tokens) gives the whole sequence back. When each
rank holds a joint [video shard, text shard] sequence (HunyuanVideo's plan), the gathered sequence
is ``Interleaved``: a ``VideoLayout`` in rank shards (``shard_layout``). Ring attention (a shard
attended alone) has no ``VideoLayout``: ``shard_layout`` says why for a person.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from rf_compile.layout import VideoLayout
from rf_compile.passes.nodes import ALL_TO_ALL_OPS, VIEW_OPS, WAIT_OPS, op_name
from rf_compile.passes.spans import Dim, Interleaved, Piece, Ranks, Span, TensorDims, whole
from rf_compile.passes.symbols import shape_of

SHARD_HINT = "RainFusion needs the whole sequence of a head on one rank (Ulysses: ulysses_degree > 1, ring_degree 1)"
# Measured by benchmarks/ring_skip.py (results/cpu/ring_skip.md): Wan2.1 480p, HunyuanVideo 720p, CogVideoX-5B.
RING_DECISION = (
    "a sparse ring is not built: with v1's mix of heads no ring step can be skipped at cp 2, 4 or 8 on Wan2.1, "
    "HunyuanVideo or CogVideoX (temporal and textural heads need every K/V shard), and a skipped step would hold "
    "only blocks that Ulysses + RainFusion already skips (benchmarks/ring_skip.py)"
)


def shard_layout(spans: Sequence[Span], seq: int) -> VideoLayout | str | None:
    """The layout of a sequence made of rank shards, or why it has none; None if it holds no shard."""
    for _, info in spans:
        if isinstance(info, Piece):
            return (
                f"sequence-sharded attention: the {seq} query tokens are 1 of {info.parts} chunks of the sequence "
                f"(context-parallel ring attention, or a shard not gathered by an all-to-all); {SHARD_HINT}; "
                f"{RING_DECISION}"
            )
        if isinstance(info, Interleaved):
            return interleaved_layout(info)
        if isinstance(info, Ranks):
            return f"sequence shards that no VideoLayout describes (an all-to-all's rank dimension); {SHARD_HINT}"
    return None


def interleaved_layout(info: Interleaved) -> VideoLayout | str:
    """Ranks' [text, video shard, text] sequences, rank after rank: a VideoLayout in ``info.parts`` shards."""
    known = [i for i, (_, span) in enumerate(info.local) if span is not None]
    index = known[0] if len(known) == 1 else None
    piece = info.local[index][1] if index is not None else None
    grid = None
    if isinstance(piece, Piece) and piece.parts == info.parts:
        grid = whole(piece.whole, info.parts * info.local[index][0])
    if not isinstance(grid, tuple) or len(grid) not in (2, 3):
        what = ", ".join(f"{length} {'other' if span is None else _kind(span)} tokens" for length, span in info.local)
        return (
            f"sequence shards that no VideoLayout describes: after a {info.parts}-way all-to-all each rank's "
            f"[{what}] follow each other (supported: one video shard and text per rank); {SHARD_HINT}"
        )
    frames, height, width = grid if len(grid) == 3 else (1, *grid)
    lead = sum(length for length, _ in info.local[:index])
    trail = sum(length for length, _ in info.local[index + 1 :])
    return VideoLayout(frames, height, width, lead * info.parts, trail * info.parts, shards=info.parts)


def _kind(info: object) -> str:
    if isinstance(info, Piece):
        return f"{info.parts}-way shard"
    return "grid" if isinstance(info, tuple) else type(info).__name__


def gather_pieces(ranks: Ranks, dim: Dim, size: int) -> Dim:
    """flatten(ranks, tokens) after an all-to-all: each rank's piece, in rank order, is the whole sequence."""
    piece = whole(dim, size)
    if isinstance(piece, Piece) and piece.parts == ranks.parts:
        return piece.whole
    if dim is not None and any(isinstance(info, Piece) for _, info in dim):
        return ((ranks.parts * size, Interleaved(dim, ranks.parts)),)
    return None


def exchange_dims(node: torch.fx.Node, shape: tuple, dims: dict[torch.fx.Node, TensorDims]) -> TensorDims:
    """``reshape(wait(all_to_all_single(flatten(t))), t.shape)``: the all-to-all of Ulysses attention.

    ``t`` is (n, ...) with n the group size: slice j goes to rank j, and after the exchange slice j
    came from rank j. Dimension 0 becomes ``Ranks(n)``; the others keep what they were (a
    ``Piece`` of a sequence stays one: merged with the ranks by a later flatten, it is whole again).
    """
    while op_name(node) in WAIT_OPS and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if op_name(node) not in ALL_TO_ALL_OPS or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    flat = node.args[0]
    splits = [a for a in (*node.args[1:3], node.kwargs.get("output_split_sizes")) if isinstance(a, (list, tuple))]
    source = flat.args[0] if op_name(flat) in VIEW_OPS and flat.args else None
    if not isinstance(source, torch.fx.Node) or shape_of(source) != shape or not shape or shape[0] is None:
        return None
    parts = len(splits[0]) if splits else shape[0]
    if parts != shape[0] or any(len(set(s)) != 1 for s in splits):
        return None  # uneven splits (Ulysses "anything"): not a plain exchange
    tensor = dims.get(source) or (None,) * len(shape)
    return (((parts, Ranks(parts)),), *tensor[1:])
