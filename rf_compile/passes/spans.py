"""Span algebra of the layout pass: what each stretch of a tensor dimension is.

A dimension is read as consecutive spans ``(length, info)``. ``info`` says what the tokens of the
span are: ``None`` (not a flattened grid: text, or unknown), a ``Grid`` (the factors of a flattened
frames x height x width or height x width grid, outermost first, sizes of 1 dropped), a ``Conflict``
(two different grids claim the same tokens) or, under context parallelism, a ``Piece`` / ``Ranks``
/ ``Interleaved`` (``sequence_shards``). This module only combines spans (cut, join, merge two views of
one dimension); which op does what to them is ``dim_rules``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

Grid = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Conflict:
    """Two different grids claim the same tokens."""

    what: str


@dataclasses.dataclass(frozen=True)
class Piece:
    """One of ``parts`` equal chunks of a dimension whose spans are ``whole`` (a sequence shard, e.g.
    this rank's part under context parallelism); the chunk cuts a grid, so locally it is no grid."""

    whole: Dim
    parts: int


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Dimension 0 after a ``parts``-way all-to-all: which rank each slice came from."""

    parts: int


@dataclasses.dataclass(frozen=True)
class Interleaved:
    """A whole dimension made of ``parts`` ranks' sequences, rank after rank, each rank's spans being
    ``local`` (Ulysses over per-rank [video shard, text shard] sequences); ``sequence_shards`` reads
    it as a ``VideoLayout`` in rank shards."""

    local: tuple[Span, ...]
    parts: int


SpanInfo = Grid | Conflict | Piece | Ranks | Interleaved | None
Span = tuple[int, SpanInfo]
# A dimension: None (one span of unknown tokens) or spans covering it in order.
Dim = tuple[Span, ...] | None
# A tensor: None (no dimension known) or one Dim per dimension.
TensorDims = tuple[Dim, ...] | None


def dim_at(tensor: TensorDims, index: int) -> Dim:
    if tensor is None or not -len(tensor) <= index < len(tensor):
        return None
    return tensor[index]


def normalize(spans: Iterable[tuple[int, SpanInfo]]) -> Dim:
    """Join neighbouring unknown spans; a dimension with no grid at all is None."""
    out: list[tuple[int, SpanInfo]] = []
    for length, info in spans:
        if length == 0:
            continue
        if info is None and out and out[-1][1] is None:
            out[-1] = (out[-1][0] + length, None)
        else:
            out.append((length, info))
    return tuple(out) if any(info is not None for _, info in out) else None


def bounds(spans: tuple[tuple[int, SpanInfo], ...]) -> list[int]:
    bounds = [0]
    for length, _ in spans:
        bounds.append(bounds[-1] + length)
    return bounds


def slice_dim(dim: Dim, start: int, stop: int) -> Dim:
    """Spans of ``dim[start:stop]``; a grid cut in part is no longer a grid."""
    if dim is None:
        return None
    out = []
    for (length, info), lo in zip(dim, bounds(dim)[:-1], strict=True):
        a, b = max(lo, start), min(lo + length, stop)
        if a < b:
            out.append((b - a, info if (a, b) == (lo, lo + length) else None))
    return normalize(out)


def merge_dims(a: Dim, b: Dim) -> Dim:
    """What two views of the same dimension say together (finer grid wins; different grids conflict)."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    cuts = sorted(set(bounds(a)) | set(bounds(b)))
    pieces = []
    for lo, hi in itertools.pairwise(cuts):
        first, second = _span_at(a, lo, hi), _span_at(b, lo, hi)
        pieces.append((hi - lo, _merge_info(first, second)))
    return normalize(pieces)


def _span_at(dim: tuple[tuple[int, SpanInfo], ...], lo: int, hi: int) -> SpanInfo:
    for (length, info), start in zip(dim, bounds(dim)[:-1], strict=True):
        if start <= lo and hi <= start + length:
            return info if (lo, hi) == (start, start + length) else None
    return None


def _merge_info(a: SpanInfo, b: SpanInfo) -> SpanInfo:
    if a is None or a == b or isinstance(a, Conflict):
        return b if a is None else a
    if b is None or isinstance(b, Conflict):
        return a if b is None else b
    if not (isinstance(a, tuple) and isinstance(b, tuple)):
        return Conflict(f"{_describe(a)} and {_describe(b)}")
    if refines(a, b):
        return a
    if refines(b, a):
        return b
    return Conflict(f"grids {'x'.join(map(str, a))} and {'x'.join(map(str, b))}")


def _describe(info: SpanInfo) -> str:
    if isinstance(info, tuple):
        return "grid " + "x".join(map(str, info))
    if isinstance(info, Piece):
        return f"a {info.parts}-way sequence shard"
    if isinstance(info, Interleaved):
        return f"{info.parts} interleaved rank shards"
    return "an all-to-all rank dimension"


def refines(fine: tuple[int, ...], coarse: tuple[int, ...]) -> bool:
    """Whether grouping neighbours of ``fine`` gives ``coarse``."""
    i = 0
    for size in coarse:
        product = 1
        while product < size and i < len(fine):
            product *= fine[i]
            i += 1
        if product != size:
            return False
    return i == len(fine) and math.prod(fine) == math.prod(coarse)


def whole(dim: Dim, size: int) -> SpanInfo:
    """The info of a dimension that is a single span, else None."""
    if dim is None or len(dim) != 1 or dim[0][0] != size:
        return None
    return dim[0][1]


def sub_factors(factors: Sequence[int], before: int, size: int) -> tuple[int, ...] | None:
    """The run of ``factors`` whose product is ``size`` after a run whose product is ``before``."""
    product, start = 1, 0
    while product < before and start < len(factors):
        product *= factors[start]
        start += 1
    if product != before:
        return None
    product, stop = 1, start
    while product < size and stop < len(factors):
        product *= factors[stop]
        stop += 1
    return tuple(factors[start:stop]) if product == size else None


def align(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of dimensions of ``a`` and ``b`` with equal products (size-1 dimensions alone)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and j < len(b) and a[i] == b[j]:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
        elif i < len(a) and a[i] == 1:
            groups.append(([i], []))
            i += 1
        elif j < len(b) and b[j] == 1:
            groups.append(([], [j]))
            j += 1
        elif i < len(a) and j < len(b):
            in_dims, out_dims, pa, pb = [i], [j], a[i], b[j]
            while pa != pb:
                if pa < pb:
                    i += 1
                    if i >= len(a):
                        return None
                    in_dims.append(i)
                    pa *= a[i]
                else:
                    j += 1
                    if j >= len(b):
                        return None
                    out_dims.append(j)
                    pb *= b[j]
            groups.append((in_dims, out_dims))
            i, j = i + 1, j + 1
        else:
            return None
    return groups


def has_grid(dim: Dim) -> bool:
    return dim is not None and any(isinstance(info, (tuple, Piece)) for _, info in dim)
