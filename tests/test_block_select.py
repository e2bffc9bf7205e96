"""The fused v2 selection kernel (``kernels.block_select``) against the PyTorch path of ``ops.v2``.

CPU: Triton's interpreter on small shapes (M not a power of two, N not a multiple of the block,
several plans, head dims that are not a multiple of the kernel's 16-wide slices). GPU: real sizes.
Plans must be identical (counts, index lists, full flags) except on rows whose selection boundary is
within rounding of a competing block or of ``mass`` (``ambiguous_rows``), which the two fp32 paths
may resolve differently.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rf_compile.config import RainFusionConfig
from rf_compile.kernels.block_sparse import plan_extras
from rf_compile.layout import VideoLayout
from rf_compile.ops import v2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def forced_blocks(M: int, forced: int, device=DEVICE) -> torch.Tensor:
    """Bool [M, M]: the first ``forced`` rows and columns and the diagonal, as v2's sink blocks."""
    mask = torch.eye(M, dtype=torch.bool)
    mask[:forced] = True
    mask[:, :forced] = True
    return mask.to(device)


def ambiguous_rows(pooled_q, pooled_k, scale, config, always, rtol=1e-5) -> torch.Tensor:
    """Bool [P, M]: rows whose selection flips under a relative perturbation ``rtol`` of the probabilities
    (float64): the last kept and first dropped values among the blocks not forced (``always``, taken first
    and inside the budget), or (mass rule) a prefix sum and ``mass``."""
    probs = torch.softmax(pooled_q.double() @ pooled_k.double().transpose(-1, -2) * scale, -1)
    forced = always.to(probs.device).expand_as(probs)
    forced_mass = torch.where(forced, probs, 0.0).sum(-1)
    values = torch.where(forced, 0.0, probs).sort(-1, descending=True).values
    M = values.shape[-1]
    free = M - forced.sum(-1)
    count = torch.clamp(v2.keep_count(M, config) - forced.sum(-1), min=0)
    near = torch.zeros(values.shape[:-1], dtype=torch.bool, device=values.device)
    if config.select == "mass":
        before = forced_mass[..., None] + values.cumsum(-1) - values  # mass above each rank, forced first
        count = torch.minimum((before < config.mass).sum(-1), count)
        near |= ((before - config.mass).abs() < rtol * config.mass).any(-1)
    inside = (count > 0) & (count < free)  # a boundary between kept and dropped free blocks
    last = values.gather(-1, (count - 1).clamp(min=0)[..., None])[..., 0]
    following = values.gather(-1, count.clamp(max=M - 1)[..., None])[..., 0]
    return near | (inside & ((last - following) < rtol * last))


def assert_same_lists(fused, reference, ambiguous=None):
    """Equal counts, index lists and full flags, row by row (rows in ``ambiguous`` may differ)."""
    (num, idx, full), (ref_num, ref_idx, ref_full) = fused, reference
    assert num.dtype == idx.dtype == torch.int32 and full.dtype == torch.bool
    assert num.shape == ref_num.shape and idx.shape == ref_idx.shape and full.shape == ref_full.shape
    same = (num == ref_num) & (idx == ref_idx).all(-1) & (full == ref_full).all(-1)
    if ambiguous is not None:
        same |= ambiguous
    assert same.all(), f"{int((~same).sum())} rows differ, first at {(~same).nonzero()[0].tolist()}"


def both_paths(pooled_q, pooled_k, always, scale, config, dense=None):
    args = (pooled_q, pooled_k, always, scale, config, dense)
    return v2.block_lists(*args, fused=True), v2.block_lists(*args, fused=False)


CONFIGS = {
    "topk": RainFusionConfig(mode="v2", sparsity=0.7),
    "mass": RainFusionConfig(mode="v2", sparsity=0.4, select="mass", mass=0.7),
    "mass_uncapped": RainFusionConfig(mode="v2", sparsity=0.0, select="mass", mass=0.95),
    "topk_one": RainFusionConfig(mode="v2", sparsity=0.99),
}


@pytest.mark.parametrize("lane_dim", [2, 0], ids=["lanes_last", "lanes_first"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("M, D", [(37, 24), (16, 64), (70, 16), (5, 8)])
def test_fused_lists_equal_the_torch_path(config_name, M, D, lane_dim, monkeypatch):
    """Both tile arrangements (``_lane_dim``: Triton 3.7 and 3.6 lay them out alike) select alike."""
    from rf_compile.kernels import block_select

    monkeypatch.setattr(block_select, "_lane_dim", lambda: lane_dim)
    config = CONFIGS[config_name]
    P = 3
    # Logits from nearly flat (std 0.05) to peaked (std 3) rows: the mass rule binds on some, the cap on others.
    pooled_q = torch.randn(P, M, D, device=DEVICE) * torch.linspace(0.05, 3, M, device=DEVICE)[:, None]
    pooled_k = torch.randn(P, M, D, device=DEVICE)
    always = forced_blocks(M, forced=min(2, M - 1))
    scale = D**-0.5
    fused, reference = both_paths(pooled_q, pooled_k, always, scale, config)
    ambiguous = ambiguous_rows(pooled_q, pooled_k, scale, config, always)
    assert ambiguous.float().mean() < 0.05
    assert_same_lists(fused, reference, ambiguous)
    if config_name == "mass" and M > 8:  # both branches of the mass rule ran
        free = v2.block_lists(pooled_q, pooled_k, torch.zeros_like(always), scale, config)[0]
        assert (free < v2.keep_count(M, config)).any() and (free == v2.keep_count(M, config)).any()


@pytest.mark.parametrize("select", ["topk", "mass"])
def test_dense_flag_keeps_every_block(select):
    config = CONFIGS[select]
    P, M, D = 2, 21, 16
    pooled_q, pooled_k = (torch.randn(P, M, D, device=DEVICE) for _ in range(2))
    always = forced_blocks(M, forced=1)
    for flag in (False, True):
        dense = torch.tensor(flag, device=DEVICE)
        fused, reference = both_paths(pooled_q, pooled_k, always, D**-0.5, config, dense)
        assert_same_lists(fused, reference)
        assert bool((fused[0] == M).all()) == flag


def test_strided_pooled_means():
    """Key means in [P, D, M] memory (as v2 writes them on CUDA), query means a slice of a stacked pair."""
    M, D = 19, 32
    stacked = torch.randn(6, M, 2, D, device=DEVICE)
    pooled_q = stacked[:, :, 0]
    pooled_k = torch.randn(6, D, M, device=DEVICE).transpose(1, 2)
    always = forced_blocks(M, forced=3)
    assert_same_lists(*both_paths(pooled_q, pooled_k, always, 0.3, CONFIGS["topk"]))


@pytest.mark.parametrize("select", ["topk", "mass"])
def test_ties_keep_the_torch_count_and_the_lowest_blocks(select):
    """Equal probabilities (zero queries: a uniform softmax): the count is the PyTorch path's, the blocks
    the lowest-indexed ones (``torch.topk`` picks an unspecified subset of a tie)."""
    config = RainFusionConfig(mode="v2", sparsity=0.5, select=select, mass=0.43)
    P, M, D = 2, 20, 16
    pooled_q, pooled_k = torch.zeros(P, M, D, device=DEVICE), torch.randn(P, M, D, device=DEVICE)
    always = torch.zeros(M, M, dtype=torch.bool, device=DEVICE)
    num, idx, full = v2.block_lists(pooled_q, pooled_k, always, 1.0, config, fused=True)
    ref_num = v2.block_lists(pooled_q, pooled_k, always, 1.0, config)[0]
    expected = math.ceil(0.43 * M) if select == "mass" else v2.keep_count(M, config)  # 9 of 1/20 each, or 10
    assert (num == expected).all() and torch.equal(num, ref_num)
    lowest = torch.arange(M, dtype=torch.int32, device=DEVICE) * (torch.arange(M, device=DEVICE) < expected)
    assert torch.equal(idx, lowest.expand(P, M, M))


def test_tie_at_the_threshold_fills_by_index():
    """Values above the threshold all kept, a partial tie group filled from the lowest key block."""
    M = 16
    config = RainFusionConfig(mode="v2", sparsity=0.75)  # keep 4
    logits = torch.tensor([0.0, 3, 1, 2, 1, 0, 1, 1, 0, 0, 5, 0, 0, 1, 0, 0], device=DEVICE)  # 5, 3, 2, then 1 x 5
    pooled_q = torch.ones(1, M, 1, device=DEVICE)
    pooled_k = logits.view(1, M, 1)
    always = torch.zeros(M, M, dtype=torch.bool, device=DEVICE)
    num, idx, _ = v2.block_lists(pooled_q, pooled_k, always, 1.0, config, fused=True)
    assert (num == 4).all()
    assert idx[0, :, :4].tolist() == [[1, 2, 3, 10]] * M


def test_rows_longer_than_the_kernel_take_the_torch_path(monkeypatch):
    from rf_compile.kernels import block_select as kernel

    def refuse(*args, **kwargs):
        raise AssertionError("the kernel ran on rows longer than MAX_BLOCKS")

    M, D = 20, 16
    pooled_q, pooled_k = (torch.randn(2, M, D, device=DEVICE) for _ in range(2))
    always = forced_blocks(M, forced=1)
    reference = v2.block_lists(pooled_q, pooled_k, always, 0.25, CONFIGS["topk"])
    monkeypatch.setattr(kernel, "MAX_BLOCKS", M - 1)
    monkeypatch.setattr(kernel, "block_select", refuse)
    assert_same_lists(v2.block_lists(pooled_q, pooled_k, always, 0.25, CONFIGS["topk"], fused=True), reference)


LAYOUTS = [
    VideoLayout(5, 6, 9, prefix=7, suffix=3),  # N = 280: text on both sides, ragged last block
    VideoLayout(4, 9, 10),  # N = 360
    VideoLayout(1, 7, 11, suffix=5),  # an image: no sink frame
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("select", ["topk", "mass"])
def test_predict_plan_fused_equals_torch(layout, select):
    """The whole prediction (tile order, block means, sink/text/diagonal blocks), B * H = 6 plans."""
    tile = (2, 2, 4) if layout.frames > 1 else (1, 4, 4)
    config = RainFusionConfig(mode="v2", sparsity=0.6, select=select, mass=0.3, tile=tile)
    q, k = (torch.randn(2, 3, layout.seq_len, 16, device=DEVICE) for _ in range(2))
    for dense in (None, torch.tensor(False, device=DEVICE)):
        fused = v2.predict_plan(q, k, layout, config, block=16, dense=dense, fused=True)
        reference = v2.predict_plan(q, k, layout, config, block=16, dense=dense, fused=False)
        lists = [(t.kv_num_blocks, t.kv_indices, t.block_full) for t in (fused, reference)]
        assert_same_lists(*lists)
        assert fused.density().max() < 1.0
        # The kernel's lists and launch order the table brings, against the launcher's general derivation.
        made = plan_extras(fused)
        derived = plan_extras(dataclasses.replace(fused, masked_last=None, schedule=None))
        for name in ("kv_indices", "num_masked", "q_blocks_heavy_first", "num_heavy"):
            assert torch.equal(made[name], derived[name]), name


# -- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("select", ["topk", "mass"])
def test_gpu_fused_lists_at_wan_720p(select):
    """Wan2.1-14B at 720p (N = 75,600: M = 591 blocks of 128), 40 heads, CFG batch 2: 80 plans."""
    layout = VideoLayout(21, 45, 80)
    config = RainFusionConfig(mode="v2", sparsity=0.8, select=select, mass=0.6)
    static = v2.warm_static(torch.empty(2, 40, 0, device="cuda"), layout, config)
    M = static.always.shape[0]
    assert M == 591
    pooled_q = torch.randn(80, M, 128, device="cuda") * 2
    pooled_k = torch.randn(80, 128, M, device="cuda").transpose(1, 2)  # [D, M] memory, as predict_plan's
    scale = 128**-0.5
    fused, reference = both_paths(pooled_q, pooled_k, static.always, scale, config)
    ambiguous = ambiguous_rows(pooled_q, pooled_k, scale, config, static.always)
    assert ambiguous.float().mean() < 0.01
    assert_same_lists(fused, reference, ambiguous)


@pytest.mark.gpu
def test_gpu_predict_plan_fused_equals_torch():
    """predict_plan on CUDA (fused by default) against its PyTorch path, from token-level q and k whose
    blocks have distinct means (random tokens alone pool to near-uniform scores: near-ties everywhere)."""
    layout = VideoLayout(21, 30, 52)  # Wan2.1-14B 480p, N = 32,760
    config = RainFusionConfig(mode="v2", sparsity=0.8)
    B, H, D, block = 2, 8, 128, 128
    order = v2.tile_order(layout, v2.default_tile(layout), v2.sink_frame_count(layout, config))
    block_of_token = torch.empty_like(order)
    block_of_token[order] = torch.arange(layout.seq_len) // block
    M = int(block_of_token.max()) + 1
    q, k = (
        (torch.randn(B, H, M, D)[:, :, block_of_token] + 0.5 * torch.randn(B, H, layout.seq_len, D))
        .to("cuda", torch.bfloat16)
        for _ in range(2)
    )
    fused = v2.predict_plan(q, k, layout, config)
    reference = v2.predict_plan(q, k, layout, config, fused=False)
    static = v2.warm_static(q, layout, config)
    pooled_q, pooled_k = (v2.block_means(x, static, block).reshape(B * H, M, D) for x in (q, k))
    ambiguous = ambiguous_rows(pooled_q, pooled_k, D**-0.5, config, static.always)
    assert ambiguous.float().mean() < 0.01
    lists = [(t.kv_num_blocks, t.kv_indices, t.block_full) for t in (fused, reference)]
    assert_same_lists(*lists, ambiguous)


@pytest.mark.parametrize("select", ["topk", "mass"])
def test_per_plan_budgets_equal_the_torch_path(select):
    """A budget per plan (a calibration profile's per-head densities), forced blocks inside it."""
    config = RainFusionConfig(mode="v2", select=select, mass=0.8)
    P, M, D = 4, 23, 16
    pooled_q = torch.randn(P, M, D, device=DEVICE) * torch.linspace(0.1, 3, M, device=DEVICE)[:, None]
    pooled_k = torch.randn(P, M, D, device=DEVICE)
    always = forced_blocks(M, forced=2)
    keep = torch.tensor([1, 4, 12, 23], dtype=torch.int32, device=DEVICE)
    args = (pooled_q, pooled_k, always, D**-0.5, config)
    fused = v2.block_lists(*args, fused=True, keep=keep)
    reference = v2.block_lists(*args, fused=False, keep=keep)
    assert_same_lists(fused, reference)
    rows = ~always.all(-1)  # rows not forced whole
    assert (fused[0][:, rows] <= torch.clamp(keep[:, None], min=3)).all()  # 2 forced columns + the diagonal
    if select == "topk":
        assert (fused[0][-1] == M).all()
