"""RainFusion 2.0: block-mean mask prediction over spatio-temporal tiles.

1. A token order puts every kernel block of video tokens on a compact 3-D tile (by default
   2 frames x 8 x 8 for video, 1 x 8 x 16 for images): the first ``sink_frames`` frames first
   (tiled within the frame), then slabs of ``tile[0]`` frames cut into whole tiles, then each
   slab's leftover rows and columns in raster order. Text stays where it was.
   With ``order="tokens"`` the blocks are cut from the model's own token order instead (frame-major
   rows), read in place (on the trained fidelity models its attention error is lower, its PSNR a tie).
2. Q and K are mean-pooled per block in that order; pooled scores (softmax over key blocks)
   predict which key blocks each query block needs: top-k or cumulative mass, the forced blocks
   counted inside the budget (so ``sparsity=0.8`` skips 80% of a query block's key blocks). On CUDA the scores,
   the selection, the forced blocks and the block lists are one Triton kernel
   (``kernels.block_select``); the PyTorch path (``select_blocks``, ``listed_blocks``) is its
   reference and the CPU path.
3. Text blocks and sink blocks are always attended (rows and columns), so is the diagonal: they
   are chosen first, and only the rows forced whole (text and sink query blocks) exceed the budget.
The result is a ``PlanTable`` with one plan per (batch element, head), run by the same
block-sparse kernel as v1. Everything is computed on the device; the host never waits.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.ops.shared_budget import select_shared
from rf_compile.plan import BLOCK_M, PlanTable, heavy_first_order, listed_blocks


def default_tile(layout: VideoLayout, block: int = BLOCK_M) -> tuple[int, int, int]:
    """2 frames x square-ish tile for video, 1 frame x (h, 2h) for images, holding ``block`` tokens."""
    frames = 2 if layout.frames > 1 else 1
    rest = block // frames
    height = 2 ** int(math.log2(math.isqrt(rest)))
    return frames, height, rest // height


def sink_frame_count(layout: VideoLayout, config: RainFusionConfig) -> int:
    """The option's sink frames, at most the layout's frames."""
    return min(config.sink_frames, layout.frames)


@functools.lru_cache(maxsize=32)
def tile_order(layout: VideoLayout, tile: tuple[int, int, int], sink_frames: int, device: str = "cpu") -> torch.Tensor:
    """Permutation (``order[p]`` = original index of position ``p``) putting blocks on 3-D tiles.

    Indices are where the tokens lie (``VideoLayout.placed``: rank shards of a Ulysses sequence)."""
    F, H, W, P = layout.frames, layout.height, layout.width, layout.prefix
    grid = torch.arange(layout.video_tokens).view(F, H, W) + P
    tile_t, tile_h, tile_w = tile
    image_tile = default_tile(VideoLayout(1, H, W), tile_t * tile_h * tile_w)
    pieces = [torch.arange(P)]
    slabs = [(0, sink_frames, image_tile)] if sink_frames else []
    slabs += [(f, min(f + tile_t, F), tile) for f in range(sink_frames, F, tile_t)]
    for start, stop, (_, th, tw) in slabs:
        slab = grid[start:stop]
        nh, nw = H // th, W // tw
        core = slab[:, : nh * th, : nw * tw].reshape(stop - start, nh, th, nw, tw)
        pieces.append(core.permute(1, 3, 0, 2, 4).reshape(-1))
        leftover = torch.ones(slab.shape, dtype=torch.bool)
        leftover[:, : nh * th, : nw * tw] = False
        pieces.append(slab[leftover])
    pieces.append(torch.arange(P + layout.video_tokens, layout.seq_len))
    return layout.placed(torch.cat(pieces)).to(device)


def pooling_matrix(
    layout: VideoLayout, tile: tuple[int, int, int], sink_frames: int, block: int, device: str = "cpu"
) -> torch.Tensor:
    """float32 [blocks, N] matrix averaging the tokens of each block of the tile order (CPU pooling)."""
    return _pooling(tile_order(layout, tile, sink_frames), block).to(device)


def _pooling(order: torch.Tensor, block: int) -> torch.Tensor:
    """float32 [blocks, N]: the mean of each ``block`` consecutive positions of ``order``."""
    N = len(order)
    block_of_token = torch.empty_like(order)
    block_of_token[order] = torch.arange(N) // block
    blocks = -(-N // block)
    counts = torch.bincount(block_of_token, minlength=blocks)
    matrix = torch.zeros(blocks, N)
    matrix[block_of_token, torch.arange(N)] = 1.0 / counts[block_of_token]
    return matrix


def block_means(x: torch.Tensor, static: _Static, block: int, blocks_fastest: bool = False) -> torch.Tensor:
    """Mean of ``x`` [B, H, N, D] over the tokens of each block -> float32 [B, H, blocks, D].

    On CUDA a Triton kernel reads x once; elsewhere one matmul with the averaging matrix.
    ``blocks_fastest``: on CUDA, the result is a view of [B, H, D, blocks] memory (the same values),
    the layout ``kernels.block_select`` reads key means in.
    """
    if x.is_cuda:
        from rf_compile.kernels.block_mean import block_means as triton_block_means

        B, H, N, D = x.shape
        M = -(-N // block)
        out = torch.empty(B, H, D, M, device=x.device).transpose(-1, -2) if blocks_fastest else None
        return triton_block_means(x, static.orders[1], block, out)
    return torch.matmul(static.pooling.to(x.dtype), x).float()


SHARE_ROUNDING = 1e-9  # taken off M * share before the ceiling, on the host and on the device alike


def keep_count(key_blocks: int, config: RainFusionConfig) -> int:
    """Most key blocks kept per query block, forced ones included: ``ceil(key_blocks * (1 - sparsity))``, >= 1
    (less a rounding tolerance: ``1 - 0.7`` is a hair over 0.3, which would keep a fourth block of ten)."""
    return max(1, math.ceil(key_blocks * (1.0 - config.sparsity) - SHARE_ROUNDING))


@functools.lru_cache(maxsize=16)
def nonlocal_config(config: RainFusionConfig) -> RainFusionConfig:
    """The v2 settings of v1's block-predicted non-local heads: ``textural_density`` of the key blocks, in v1's
    ``order`` (v2's own default order is another), ramped over the steps as v1's ``sparsity_ramp`` says."""
    return dataclasses.replace(config, mode="v2", sparsity=1.0 - config.nonlocal_density, sparsity_ramp=config.ramp,
                               order=config.block_order, textural=None, textural_density=None)


def ramp_densities(config: RainFusionConfig, progress: torch.Tensor, heads: int) -> torch.Tensor:
    """float64 [heads]: every head's share of key blocks at ``progress`` (0: first sparse step, 1: last)
    through the sparse steps, for option ``sparsity_ramp``; the mean over the steps is ``1 - sparsity``."""
    # 1 - (sparsity - ramp + 2 ramp progress), in two device ops (every call of every site runs it)
    return progress.mul(-2 * config.ramp).add_(1.0 - config.sparsity + config.ramp).expand(heads)


def select_blocks(
    scores: torch.Tensor,
    config: RainFusionConfig,
    forced: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool [..., Mk]: key blocks chosen per query block from predicted probabilities [..., Mk].

    ``forced`` (bool, broadcast to ``scores``) blocks are taken first and count inside the budget of
    ``keep_count`` blocks (and, with ``select="mass"``, their probability inside the mass); a row with
    more forced blocks than the budget keeps all of them and nothing else. ``keep`` (int [P] for
    scores [P, Mq, Mk]) replaces the budget per plan (a calibration profile). The PyTorch path and the
    reference of ``kernels.block_select``, which does this and the lists in one pass.
    """
    Mk = scores.shape[-1]
    keep_max = Mk if keep is not None else keep_count(Mk, config)
    ranked = scores if forced is None else scores.masked_fill(forced, float("inf"))
    top = ranked.topk(keep_max, dim=-1)
    rank = torch.arange(keep_max, device=scores.device)
    within = torch.ones_like(top.values, dtype=torch.bool)
    if keep is not None:
        within = within & (rank < keep.view(-1, 1, 1))
    if config.select == "mass":  # the smallest prefix of the top blocks covering ``mass``, at least one
        values = scores.gather(-1, top.indices)
        covered_before = values.cumsum(-1) - values
        within = within & ((covered_before < config.mass) | (rank == 0))
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, within)
    return chosen if forced is None else chosen | forced


def predict_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    config: RainFusionConfig,
    scale: float | None = None,
    block: int = BLOCK_M,
    dense: torch.Tensor | None = None,
    fused: bool | None = None,
    densities: torch.Tensor | None = None,
) -> PlanTable:
    """One block plan per (batch element, head) from block means; variant id of head (b, h) is ``b * H + h``.

    ``block`` is the kernel block (query and key); tests use small ones on small layouts.
    ``dense`` (a bool scalar on the device) selects every block: a dense warm-up call, decided
    on the device. ``fused`` selects blocks with the Triton kernel ``kernels.block_select`` (scores,
    softmax, selection, forced blocks and lists in one pass) instead of the PyTorch path; ``None``:
    on CUDA. ``fused=True`` on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1``).
    ``densities`` (float [H] on the device): each head's share of key blocks instead of ``sparsity``
    (a calibration profile), ``ceil(M * density)`` blocks, forced ones included.
    """
    static = warm_static(q, layout, config, block)
    fused = q.is_cuda if fused is None else fused
    return _predict(q, k, layout, config, scale, static, block, dense, fused, densities)


def warm_static(q: torch.Tensor, layout: VideoLayout, config: RainFusionConfig, block: int = BLOCK_M) -> _Static:
    """The cached per-layout tensors of a v2 call with ``q``'s shape (built on first use)."""
    tile = config.tile or default_tile(layout, block)
    if math.prod(tile) != block:
        raise ValueError(f"option 'tile' {tile} holds {math.prod(tile)} tokens; a kernel block holds {block}")
    B, H = q.shape[:2]
    return _static(layout, tile, sink_frame_count(layout, config), block, str(q.device), B * H, config.block_order)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What v2 needs per (layout, tile, sink frames, block, device, dtype, plans): built once."""

    orders: torch.Tensor  # int32 [2, N]: identity, the blocks' order (tiles or, again, the identity)
    pooling: torch.Tensor | None  # float32 [M, N] block-averaging matrix: the path off CUDA
    always: torch.Tensor  # bool [M, M]: text/sink rows and columns, and the diagonal
    plan_order: torch.Tensor  # int32 [P]: the order every plan reads (0: in place, for ``order="tokens"``)
    no_band: torch.Tensor  # int32 [P] of -1: no band, the blocks are the mask
    kv_valid: torch.Tensor  # int32 [P] of N
    schedule: tuple[torch.Tensor, torch.Tensor]  # the kernel's launch order: the forced (text, sink) rows first


@functools.lru_cache(maxsize=32)
def _static(layout, tile, sinks, block, device: str, plans: int, order_name: str = "tiles") -> _Static:
    N = layout.seq_len
    M = -(-N // block)
    tiles = order_name == "tiles"
    pos = torch.arange(N)
    order = tile_order(layout, tile, sinks) if tiles else layout.placed(pos)
    # Blocks holding text or sink-frame tokens (positions in the blocks' order), rows and columns.
    held = (pos < layout.prefix + sinks * layout.frame_tokens) | (pos >= layout.prefix + layout.video_tokens)
    forced = torch.zeros(M, dtype=torch.bool)
    forced[(pos[held] // block).unique()] = True
    always = forced[None, :] | forced[:, None] | torch.eye(M, dtype=torch.bool)
    ones = torch.ones(plans, dtype=torch.int32)
    return _Static(
        orders=torch.stack([pos, order]).to(device=device, dtype=torch.int32),  # order 0 is the identity
        pooling=None if device.startswith("cuda") else _pooling(order, block).to(device),
        always=always.to(device),
        plan_order=(ones if tiles or layout.shards > 1 else ones * 0).to(device),
        no_band=(-ones).to(device),
        kv_valid=(ones * N).to(device),
        schedule=tuple(t.to(device) for t in heavy_first_order(always.all(1))),  # forced rows list every block
    )


def block_lists(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    always: torch.Tensor,
    scale: float,
    config: RainFusionConfig,
    dense: torch.Tensor | None = None,
    fused: bool = False,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block lists of v2 plans from block means: scores, softmax, selection, forced blocks.

    Parameters
    ----------
    pooled_q, pooled_k: float32 [P, M, D]
        Block means, one plan per (batch element, head).
    always: bool [M, M]
        Blocks every plan keeps; ``dense`` (bool scalar on the device): keep every block.
    fused:
        One Triton pass (``kernels.block_select``) instead of the PyTorch path (``select_blocks`` and
        ``listed_blocks``, with [P, M, M] intermediates); the same lists where probabilities do not tie.
        Rows of more than ``block_select.MAX_BLOCKS`` blocks take the PyTorch path.
    keep: int32 [P], optional
        Key blocks per query block of each plan instead of ``keep_count(M, config)``.

    Returns
    -------
    kv_num_blocks int32 [P, M], kv_indices int32 [P, M, M], block_full bool [P, M, M]
    """
    M = always.shape[0]
    if fused:
        from rf_compile.kernels.block_select import MAX_BLOCKS, block_select

        if M <= MAX_BLOCKS:
            mass = config.mass if config.select == "mass" else None
            budget = keep_count(M, config) if keep is None else keep
            return block_select(pooled_q, pooled_k, always, scale, budget, mass, dense)
    scores = torch.softmax(pooled_q @ pooled_k.transpose(-1, -2) * scale, dim=-1)
    return _lists_of(select_blocks(scores, config, always, keep), dense)


def _lists_of(chosen: torch.Tensor, dense: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices, block_full) of chosen blocks bool [P, M, M]; every block where ``dense``."""
    if dense is not None:
        chosen = chosen | dense
    kv_num_blocks, kv_indices = listed_blocks(chosen)
    return kv_num_blocks, kv_indices, torch.arange(chosen.shape[-1], device=chosen.device) < kv_num_blocks[..., None]


def shared_block_lists(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    always: torch.Tensor,
    scale: float,
    config: RainFusionConfig,
    dense: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block_lists`` for a pooled ``budget`` (block means float32 [B, H, M, D]): lists of B * H plans."""
    B, H, M, _ = pooled_q.shape
    scores = torch.softmax(pooled_q @ pooled_k.transpose(-1, -2) * scale, dim=-1)
    return _lists_of(select_shared(scores, config, always, keep_count(M, config)).reshape(B * H, M, M), dense)


def _ragged_last_kept(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, seq_len: int,
                      block: int) -> torch.Tensor:
    """int32 [P, M]: the kernel's masked count of v2's lists (no band, every key valid, so every listed block is
    whole but a ragged last one, listed last as the lists ascend): 1 where a list ends with it. A gather of each
    list's last entry (every list holds at least its diagonal block), where the launcher's general path would
    sort every list."""
    if seq_len % block == 0:
        return torch.zeros_like(kv_num_blocks)
    last = kv_indices.gather(-1, (kv_num_blocks - 1).long().unsqueeze(-1)).squeeze(-1)
    return (last == kv_indices.shape[-1] - 1).to(torch.int32)


def _predict(
    q, k, layout, config, scale, static: _Static, block, dense: torch.Tensor | None, fused: bool,
    densities: torch.Tensor | None,
) -> PlanTable:
    B, H, N, D = q.shape
    M = static.always.shape[0]
    scale = D**-0.5 if scale is None else scale
    pooled_q = block_means(q, static, block).reshape(B * H, M, D)
    pooled_k = block_means(k, static, block, blocks_fastest=True).reshape(B * H, M, D)  # a view
    keep = None
    if densities is not None:  # ceil(M * d) per head, on the device
        keep = torch.ceil(densities.double() * M - SHARE_ROUNDING).clamp(1, M).to(torch.int32).repeat(B)
    if config.budget != "query_block" and densities is None:
        pooled = pooled_q.reshape(B, H, M, D), pooled_k.reshape(B, H, M, D)
        lists = shared_block_lists(*pooled, static.always, scale, config, dense)
    else:
        lists = block_lists(pooled_q, pooled_k, static.always, scale, config, dense, fused, keep)
    kv_num_blocks, kv_indices, block_full = lists
    return PlanTable(
        layout=layout,
        variants=(),
        orders=static.orders,
        q_order=static.plan_order,
        kv_order=static.plan_order,
        band=static.no_band,
        kv_valid=static.kv_valid,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        block_full=block_full,
        block_m=block,
        block_n=block,
        masked_last=(kv_indices, _ragged_last_kept(kv_num_blocks, kv_indices, N, block)),
        schedule=static.schedule,
    )
