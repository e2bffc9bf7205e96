"""Head patterns and the block plans that run them.

A *variant* is one way a head can be computed: (pattern, bandwidth) for spatial and temporal
heads, (TEXTURAL, stride) for textural ones. For one layout and config, every variant gets a
block plan once (``PlanTable``); the ARM then only writes a variant id per (batch, head) and the
kernel reads that head's plan from the table. No plan is built per call and the host never
waits for the device.

Each variant runs as block-sparse attention over a token *order*:

- queries (and the output) are read in ``orders[q_order]``, keys/values in ``orders[kv_order]``;
- position ``i`` (query) may see position ``j`` (key) iff ``i`` is a text position, or
  ``j < kv_valid`` and (``band < 0`` or ``j`` is a text position or ``|i - j| <= band``),
  where text positions are those outside ``[prefix, prefix + video_tokens)``.

Spatial heads use the identity order, temporal heads the spatial-major order (their band
becomes a diagonal band too), textural heads a key order with the checkerboard video tokens
packed after the prefix text and the dropped ones at the end (beyond ``kv_valid``).

A layout in rank shards (``VideoLayout.shards > 1``, Ulysses over per-rank [video, text] shards)
gets the same orders mapped through ``VideoLayout.placed``: the kernel's loads and stores already
go through the orders, so the permutation costs nothing. Order 0 stays the identity (the kernel
reads identity heads in place) and no variant uses it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import torch

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout

BLOCK_M = 128
BLOCK_N = 128
KERNEL_HEAD_DIMS = (64, 128)  # head dims the block-sparse kernel is built for (padded loads cost more)


def band_halfwidth(layout: VideoLayout, bandwidth: float) -> int:
    """Band half-width in tokens; ``bandwidth = 1/4`` keeps ``1 - (3/4)^2 = 7/16`` of the scores."""
    return int(bandwidth * layout.video_tokens)


class Pattern(enum.IntEnum):
    """RainFusion v1 head patterns."""

    SPATIAL = 0
    TEMPORAL = 1
    TEXTURAL = 2
    DENSE = 3  # not chosen by the ARM: the variant of dense warm-up calls, selected on the device


@dataclasses.dataclass(frozen=True)
class Variant:
    """One computable head type: a pattern and its bandwidth (spatial/temporal) or stride."""

    pattern: Pattern
    bandwidth: float = 0.0
    stride: int = 0

    def describe(self) -> str:
        if self.pattern == Pattern.DENSE:
            return "dense"
        if self.pattern == Pattern.TEXTURAL:
            return f"textural(tau={self.stride})"
        return f"{self.pattern.name.lower()}(b={self.bandwidth:g})"


def variants_for(config: RainFusionConfig) -> tuple[Variant, ...]:
    """Variants in ARM order: spatial per bandwidth, temporal per bandwidth, then textural.

    With one bandwidth (v1) the ids equal ``Pattern`` values.
    """
    bandwidths = config.head_bandwidths
    return (
        *(Variant(Pattern.SPATIAL, b) for b in bandwidths),
        *(Variant(Pattern.TEMPORAL, b) for b in bandwidths),
        Variant(Pattern.TEXTURAL, stride=config.stride),
    )


@dataclasses.dataclass
class PlanTable:
    """Block plans of every variant of one layout (FlexAttention ``BlockMask`` per variant).

    Attributes
    ----------
    orders: int32 [O, N]
        Token orders: ``orders[o, p]`` is the original index of the token at position ``p``.
        Order 0 is the identity.
    q_order, kv_order, band, kv_valid: int32 [P]
        Per variant: which order the queries / keys use, band half-width (-1: none) and the
        number of leading key positions that exist for this variant.
    kv_num_blocks: int32 [P, Mq]
        Key blocks to visit per query block.
    kv_indices: int32 [P, Mq, Mk]
        Their indices (ascending), padded with 0 past ``kv_num_blocks``.
    block_full: bool [P, Mq, Mk]
        Whether the block at ``kv_indices[p, m, t]`` needs no element mask.
    masked_last: (kv_indices, num_masked) or None
        The block-sparse kernel's lists, where the builder knows them: ``kv_indices`` with each list's blocks
        that need the element mask (not ``block_full``, or the ragged last key block) moved after the others,
        and their count, int32 [P, Mq]. Built once with a static table; v2's ascending lists of whole blocks
        are already in that form (only a ragged last block needs the mask). ``None``: the kernel's launcher
        sorts the lists itself, a dozen small device ops on every new table. Derived from the lists: a table
        made by ``dataclasses.replace`` of the lists must pass ``masked_last=None`` (and ``schedule=None``).
    schedule: (query-block order, heavy count) or None
        The kernel's heavy-first launch order (``heavy_first_order``) where the builder knows it; ``None``: the
        launcher finds the heavy rows in the lists. Any order of every query block is correct; heavy first
        only keeps the longest programs from ending the launch alone.
    """

    layout: VideoLayout
    variants: tuple[Variant, ...]
    orders: torch.Tensor
    q_order: torch.Tensor
    kv_order: torch.Tensor
    band: torch.Tensor
    kv_valid: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_full: torch.Tensor
    block_m: int = BLOCK_M
    block_n: int = BLOCK_N
    masked_last: tuple[torch.Tensor, torch.Tensor] | None = None
    schedule: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_plans(self) -> int:
        """P: one plan per variant (v1) or per (batch element, head) (v2)."""
        return self.kv_num_blocks.shape[0]

    def density(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[P] of ``dtype``: fraction of (query block, key block) pairs each variant computes (two device ops)."""
        blocks_k = -(-self.layout.seq_len // self.block_n)
        return self.kv_num_blocks.sum(-1, dtype=dtype) / (self.kv_num_blocks.shape[-1] * blocks_k)

    @functools.cached_property
    def score_density(self) -> torch.Tensor:
        """Float [P]: fraction of (query, key) token pairs each variant attends (text included)."""
        layout, N = self.layout, self.layout.seq_len
        text, video = N - layout.video_tokens, layout.video_tokens
        i = torch.arange(video, dtype=torch.float64, device=self.band.device)
        kept = []
        for p in range(self.num_plans):
            band = int(self.band[p])
            if band < 0:  # textural: every video row sees the valid keys
                per_row = torch.full_like(i, float(self.kv_valid[p]))
            else:
                per_row = text + torch.minimum(i + band, i.new_tensor(video - 1)) - torch.clamp(i - band, min=0) + 1
            kept.append((text * N + per_row.sum()) / (N * N))
        return torch.stack(kept).float()

    def to_dense(self) -> torch.Tensor:
        """Bool [P, Mq, Mk] block mask, for inspection and tests."""
        P, Mq, Mk = self.kv_indices.shape
        live = torch.arange(Mk, device=self.kv_indices.device) < self.kv_num_blocks[..., None]
        index = torch.where(live, self.kv_indices.long(), Mk)  # padding lands in a spare column
        dense = torch.zeros(P, Mq, Mk + 1, dtype=torch.bool, device=live.device)
        return dense.scatter_(-1, index, True)[..., :Mk]

    def __repr__(self) -> str:
        density = ", ".join(f"{v.describe()}={d:.2f}" for v, d in zip(self.variants, self.density().tolist()))
        return f"PlanTable({self.layout.describe()}, blocks {self.block_m}x{self.block_n}, density {density})"


def build_plan_table(
    layout: VideoLayout,
    variants: tuple[Variant, ...],
    device: torch.device | str = "cpu",
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> PlanTable:
    """Build the block plans of ``variants`` for ``layout`` (cached per arguments)."""
    return _build_plan_table(layout, variants, str(torch.device(device)), block_m, block_n)


@functools.lru_cache(maxsize=64)
def _build_plan_table(
    layout: VideoLayout, variants: tuple[Variant, ...], device: str, block_m: int, block_n: int
) -> PlanTable:
    N = layout.seq_len
    orders = [torch.arange(N, device=device)]
    temporal_id = textural_ids = None
    rows = []  # (q_order, kv_order, band, kv_valid) per variant
    for variant in variants:
        if variant.pattern == Pattern.DENSE:
            rows.append((0, 0, -1, N))
        elif variant.pattern == Pattern.SPATIAL:
            rows.append((0, 0, band_halfwidth(layout, variant.bandwidth), N))
        elif variant.pattern == Pattern.TEMPORAL:
            if temporal_id is None:
                temporal_id = len(orders)
                orders.append(layout.temporal_order(device))
            rows.append((temporal_id, temporal_id, band_halfwidth(layout, variant.bandwidth), N))
        else:
            textural_ids = textural_ids or {}
            if variant.stride not in textural_ids:
                order, kv_valid = layout.textural_order(variant.stride, device)
                textural_ids[variant.stride] = (len(orders), kv_valid)
                orders.append(order)
            order_id, kv_valid = textural_ids[variant.stride]
            rows.append((0, order_id, -1, kv_valid))

    if layout.shards > 1:  # the orders as the tokens lie; a spare identity keeps order 0 the identity
        orders = [orders[0], *(layout.placed(order) for order in orders)]
        rows = [(q + 1, kv + 1, band, valid) for q, kv, band, valid in rows]
    q_order, kv_order, band, kv_valid = (torch.tensor(col, dtype=torch.int32, device=device) for col in zip(*rows))
    any_blocks, full_blocks = _block_masks(layout, band, kv_valid, block_m, block_n)
    kv_num_blocks, kv_indices = listed_blocks(any_blocks)
    listed = torch.arange(kv_indices.shape[-1], device=device) < kv_num_blocks[..., None]
    block_full = torch.gather(full_blocks, -1, kv_indices.long()) & listed
    Mk = kv_indices.shape[-1]
    return PlanTable(
        layout=layout,
        variants=variants,
        orders=torch.stack(orders).to(torch.int32),
        q_order=q_order,
        kv_order=kv_order,
        band=band,
        kv_valid=kv_valid,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        block_full=block_full,
        block_m=block_m,
        block_n=block_n,
        masked_last=lists_masked_last(kv_indices, kv_num_blocks, block_full, N, block_n),
        schedule=heavy_first_order((kv_num_blocks >= Mk).all(0)),
    )


def lists_masked_last(kv_indices: torch.Tensor, kv_num_blocks: torch.Tensor, block_full: torch.Tensor,
                      seq_len: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_indices, num_masked): each list's blocks that need the element mask after the others, and their count.

    A block needs the mask when it is not ``block_full`` or it is the ragged last key block (its positions past
    ``seq_len`` must be masked even where the plan calls it full). The softmax does not care about the order; the
    kernel's unmasked loop then starts at 0, the form Triton's warp specialisation handles.
    """
    Mk = kv_indices.shape[-1]
    live = torch.arange(Mk, device=kv_indices.device) < kv_num_blocks[..., None]
    ragged = (kv_indices.long() + 1) * block_n > seq_len
    needs_mask = live & (~block_full | ragged)
    # Sort key: unmasked blocks 0, masked 1, padding 2 (stable keeps ascending order inside).
    key = torch.where(live, needs_mask.to(torch.int8), torch.full_like(needs_mask, 2, dtype=torch.int8))
    perm = torch.sort(key, dim=-1, stable=True).indices
    return torch.gather(kv_indices, -1, perm).to(torch.int32), needs_mask.sum(-1, dtype=torch.int32)


def heavy_first_order(heavy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch order of query blocks from bool [Mq] ``heavy`` (blocks every plan lists every key
    block for: text rows): (int32 [Mq], the heavy ones first, the others after them in order; their count,
    int32 [1]). On the device, no host sync."""
    num_heavy = heavy.sum(dtype=torch.int32)
    rank = torch.where(heavy, heavy.cumsum(0) - 1, num_heavy + (~heavy).cumsum(0) - 1)
    in_order = torch.arange(heavy.shape[0], dtype=torch.int32, device=heavy.device)
    return torch.empty_like(in_order).scatter_(0, rank, in_order), num_heavy.reshape(1)


def concat_plans(first: PlanTable, second: PlanTable) -> PlanTable:
    """One table holding ``first``'s plans, then ``second``'s (same layout and blocks; no host sync).

    ``second``'s orders other than the identity (order 0) are appended to ``first``'s, so its plans read
    the same tokens. Used to run v1's static plans and per-head predicted plans in one launch.
    """
    if (first.layout, first.block_m, first.block_n) != (second.layout, second.block_m, second.block_n):
        raise ValueError("concat_plans needs tables of one layout and block size")
    shift = first.orders.shape[0] - 1

    def moved(order: torch.Tensor) -> torch.Tensor:
        return torch.where(order > 0, order + shift, order)

    return PlanTable(
        layout=first.layout,
        variants=first.variants,
        orders=torch.cat([first.orders, second.orders[1:].to(first.orders.dtype)]),
        q_order=torch.cat([first.q_order, moved(second.q_order)]),
        kv_order=torch.cat([first.kv_order, moved(second.kv_order)]),
        band=torch.cat([first.band, second.band]),
        kv_valid=torch.cat([first.kv_valid, second.kv_valid]),
        kv_num_blocks=torch.cat([first.kv_num_blocks, second.kv_num_blocks]),
        kv_indices=torch.cat([first.kv_indices, second.kv_indices]),
        block_full=torch.cat([first.block_full, second.block_full]),
        block_m=first.block_m,
        block_n=first.block_n,
        masked_last=(None if first.masked_last is None or second.masked_last is None else
                     tuple(torch.cat(pair) for pair in zip(first.masked_last, second.masked_last))),
        schedule=first.schedule,  # v1's text rows, which v2's forced rows hold too: a hint, see the attribute
    )


def listed_blocks(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., Mq, Mk] block mask -> (kv_num_blocks int32 [..., Mq], kv_indices int32 [..., Mq, Mk]).

    Indices ascending, padded with 0; computed on the mask's device without a host sync.
    """
    kv_num_blocks = block_mask.sum(-1, dtype=torch.int32)
    # Stable sort of "not needed" puts the needed key blocks first, in ascending order.
    kv_indices = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices
    listed = torch.arange(block_mask.shape[-1], device=block_mask.device) < kv_num_blocks[..., None]
    return kv_num_blocks, torch.where(listed, kv_indices, 0).to(torch.int32)


def _block_masks(
    layout: VideoLayout, band: torch.Tensor, kv_valid: torch.Tensor, block_m: int, block_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [P, Mq, Mk] pairs of blocks that hold any / only allowed (query, key) positions."""
    N, device = layout.seq_len, band.device
    video_lo, video_hi = layout.prefix, layout.prefix + layout.video_tokens
    q_lo = torch.arange(0, N, block_m, device=device)
    q_hi = torch.clamp(q_lo + block_m, max=N) - 1  # last position in the block
    k_lo = torch.arange(0, N, block_n, device=device)
    k_hi = torch.clamp(k_lo + block_n, max=N) - 1
    q_lo, q_hi, k_lo, k_hi = q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :]

    def has_text(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return (lo < video_lo) | (hi >= video_hi)

    def all_text(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return (hi < video_lo) | (lo >= video_hi)

    min_dist = torch.clamp(torch.maximum(k_lo - q_hi, q_lo - k_hi), min=0)
    max_dist = torch.maximum(q_hi - k_lo, k_hi - q_lo)
    band_, valid = band[:, None, None], kv_valid[:, None, None]
    no_band = band_ < 0
    # Text query rows see every key; other rows see existing keys inside the band or text keys.
    any_blocks = has_text(q_lo, q_hi) | ((k_lo < valid) & (no_band | has_text(k_lo, k_hi) | (min_dist <= band_)))
    full_blocks = all_text(q_lo, q_hi) | (
        (k_hi < valid) & (no_band | all_text(k_lo, k_hi) | (max_dist <= band_))
    )
    return any_blocks, full_blocks & any_blocks


def element_mask(table: PlanTable, variant_id: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [N, N] (or [len(rows), N] for original query ``rows``): the mask a plan computes, original order.

    The token rule of the module docstring, restricted to the listed blocks (for v1 plans the
    blocks cover the rule; for v2 plans the blocks are the mask). Used by the CPU executor and tests.
    """
    layout, N = table.layout, table.layout.seq_len
    device = table.orders.device
    pos = torch.arange(N, device=device)
    rows = pos if rows is None else rows.to(device)
    video = (pos >= layout.prefix) & (pos < layout.prefix + layout.video_tokens)
    q_order = table.orders[table.q_order[variant_id]].long()
    kv_order = table.orders[table.kv_order[variant_id]].long()
    i = torch.empty_like(q_order)
    i[q_order] = pos
    i = i[rows]  # the rows' positions in the query order
    band = int(table.band[variant_id])
    allowed = (pos[None, :] < int(table.kv_valid[variant_id])).expand(len(rows), N)
    if band >= 0:
        allowed = allowed & (~video[None, :] | ((i[:, None] - pos[None, :]).abs() <= band))
    allowed = allowed | ~video[i][:, None]
    in_plan = table.to_dense()[variant_id][i[:, None] // table.block_m, pos[None, :] // table.block_n]
    mask = torch.zeros(len(rows), N, dtype=torch.bool, device=device)
    mask[:, kv_order] = allowed & in_plan
    return mask
