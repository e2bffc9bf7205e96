"""Context parallelism in the layout pass: sequence shards, and the all-to-all that joins them.

Under Ulysses attention each rank holds an equal chunk of the sequence (a ``Piece`` of the whole
dimension); an all-to-all swaps it for all tokens of some heads (dimension 0 of the exchanged
tensor becomes ``Ranks``), and flattening (ranks, tokens) gives the whole sequence back. Ring
attention (a shard attended alone) and interleaved [video, text] shards are no ``VideoLayout``:
``shard_reason`` says so for a person.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from rf_compile.passes.nodes import ALL_TO_ALL_OPS, VIEW_OPS, WAIT_OPS, op_name
from rf_compile.passes.spans import Dim, Piece, Ranks, Sharded, Span, TensorDims, whole
from rf_compile.passes.symbols import shape_of

SHARD_HINT = "RainFusion needs the whole sequence of a head on one rank (Ulysses: ulysses_degree > 1, ring_degree 1)"


def shard_reason(spans: Sequence[Span], seq: int) -> str | None:
    """Why a sequence made of shards cannot have a VideoLayout (None if it holds no shard)."""
    for _, info in spans:
        if isinstance(info, Piece):
            return (
                f"sequence-sharded attention: the {seq} query tokens are 1 of {info.parts} chunks of the sequence "
                f"(context-parallel ring attention, or a shard not gathered by an all-to-all); {SHARD_HINT}"
            )
        if isinstance(info, (Sharded, Ranks)):
            what = info.what if isinstance(info, Sharded) else "an all-to-all's rank dimension"
            return (
                f"sequence shards that no VideoLayout describes ({what}); the Ulysses all-to-all keeps each rank's "
                "token order, so shard a joint video+text sequence such that the gathered order is text, video, text "
                "(not the video of one rank, its text, the next rank's video...), or keep it dense"
            )
    return None


def gather_pieces(ranks: Ranks, dim: Dim, size: int) -> Dim:
    """flatten(ranks, tokens) after an all-to-all: each rank's piece, in rank order, is the whole sequence."""
    piece = whole(dim, size)
    if isinstance(piece, Piece) and piece.parts == ranks.parts:
        return piece.whole
    if dim is not None and any(isinstance(info, Piece) for _, info in dim):
        what = ", ".join(f"{info.parts}-way shard" if isinstance(info, Piece) else "other tokens" for _, info in dim)
        return (
            (
                ranks.parts * size,
                Sharded(
                    f"each rank's {size} tokens are [{what}]: after the all-to-all the "
                    f"shards of {ranks.parts} ranks are interleaved"
                ),
            ),
        )
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
