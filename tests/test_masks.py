"""Pattern masks against brute force from the paper's definitions, and block plans against masks."""

import dataclasses
import itertools

import pytest
import torch

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.plan import Pattern, Variant, build_plan_table, element_mask, variants_for
from rf_compile.reference import masks

LAYOUTS = [
    VideoLayout(3, 5, 7, prefix=6),
    VideoLayout(4, 3, 3, suffix=5),
    VideoLayout(2, 5, 4, prefix=3, suffix=4),
    VideoLayout(5, 4, 7),
    VideoLayout(1, 6, 5, prefix=2),
    VideoLayout(4, 3, 3, suffix=6, shards=2),  # Ulysses over per-rank [video, text] shards
    VideoLayout(4, 2, 3, prefix=3, suffix=6, shards=3),
]


def token_coords(layout):
    """(is_text, frame, h, w) per token, written out one token at a time; rank chunk after rank chunk."""
    grid = itertools.product(range(layout.frames), range(layout.height), range(layout.width))
    video = [(False, f, h, w) for f, h, w in grid]
    parts = [[(True, None, None, None)] * layout.prefix, video, [(True, None, None, None)] * layout.suffix]
    R = layout.shards
    return [token for r in range(R) for part in parts for token in part[r * len(part) // R : (r + 1) * len(part) // R]]


def brute_force(layout, kind, bandwidth=0.25, stride=2):
    coords = token_coords(layout)
    V, F, HW = layout.video_tokens, layout.frames, layout.frame_tokens
    half = int(bandwidth * V)
    N = layout.seq_len
    mask = torch.zeros(N, N, dtype=torch.bool)
    for i, j in itertools.product(range(N), range(N)):
        ti, fi, hi, wi = coords[i]
        tj, fj, hj, wj = coords[j]
        if ti or tj:
            mask[i, j] = True
        elif kind == "spatial":
            mask[i, j] = abs((fi * HW + hi * layout.width + wi) - (fj * HW + hj * layout.width + wj)) <= half
        elif kind == "temporal":
            pi, pj = (hi * layout.width + wi) * F + fi, (hj * layout.width + wj) * F + fj
            mask[i, j] = abs(pi - pj) <= half
        else:
            mask[i, j] = any(hj % stride == k and wj % stride == k for k in range(stride))
    return mask


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("bandwidth", [0.125, 0.25, 0.5])
def test_band_masks_match_brute_force(layout, bandwidth):
    assert torch.equal(masks.spatial_mask(layout, bandwidth), brute_force(layout, "spatial", bandwidth))
    assert torch.equal(masks.temporal_mask(layout, bandwidth), brute_force(layout, "temporal", bandwidth))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("stride", [2, 3, 4])
def test_textural_mask_matches_brute_force(layout, stride):
    assert torch.equal(masks.textural_mask(layout, stride), brute_force(layout, "textural", stride=stride))


def test_quarter_bandwidth_keeps_seven_sixteenths():
    layout = VideoLayout(16, 16, 16)
    for mask in (masks.spatial_mask(layout, 0.25), masks.temporal_mask(layout, 0.25)):
        assert mask.float().mean().item() == pytest.approx(7 / 16, abs=2e-3)


def test_checkerboard_keeps_one_over_stride():
    layout = VideoLayout(2, 12, 12)
    for stride in (2, 3, 4):
        assert layout.checkerboard(stride).float().mean().item() == pytest.approx(1 / stride)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_block_plans_compute_exactly_the_masks(layout, blocks):
    dense = (Variant(Pattern.DENSE),)
    variants = variants_for(RainFusionConfig(mode="v1+")) + variants_for(RainFusionConfig(stride=3)) + dense
    table = build_plan_table(layout, variants, block_m=blocks[0], block_n=blocks[1])
    block_mask = table.to_dense()
    for p, variant in enumerate(variants):
        expected = masks.pattern_mask(layout, variant.pattern, variant.bandwidth, variant.stride)
        assert torch.equal(element_mask(table, p), expected), variant
        assert table.score_density[p].item() == pytest.approx(expected.float().mean().item(), abs=1e-6)
        # In the variant's orders, a block is listed iff it holds an allowed pair; "full" ones hold only allowed
        # pairs (the flag may be conservative on blocks that mix text and video).
        permuted = expected[table.orders[table.q_order[p]].long()][:, table.orders[table.kv_order[p]].long()]
        bm, bn = blocks
        for m in range(block_mask.shape[1]):
            listed = table.kv_indices[p, m, : table.kv_num_blocks[p, m]].tolist()
            assert listed == sorted(listed)
            for t, n in enumerate(listed):
                tile = permuted[m * bm : (m + 1) * bm, n * bn : (n + 1) * bn]
                if table.block_full[p, m, t]:
                    assert bool(tile.all()), (variant, m, n)
            for n in range(block_mask.shape[2]):
                tile = permuted[m * bm : (m + 1) * bm, n * bn : (n + 1) * bn]
                assert bool(tile.any()) == bool(block_mask[p, m, n]), (variant, m, n)


PERTURBATIONS = {
    "band+1": lambda t: {"band": t.band + (t.band >= 0).int()},
    "band-1": lambda t: {"band": t.band - (t.band > 0).int()},
    "drop-a-block": lambda t: {"kv_num_blocks": (t.kv_num_blocks - 1).clamp(min=0)},
    "kv_valid-1": lambda t: {"kv_valid": t.kv_valid - 1},
    "swap-orders": lambda t: {"kv_order": t.kv_order.flip(0)},
}


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_a_wrong_plan_differs_from_the_paper_masks(name):
    """The reference shares no code with the plan, so a perturbed plan must fail the comparison."""
    layout = LAYOUTS[2]
    variants = variants_for(RainFusionConfig())
    good = build_plan_table(layout, variants, block_m=16, block_n=16)
    bad = dataclasses.replace(good, **PERTURBATIONS[name](good))
    expected = [masks.pattern_mask(layout, v.pattern, v.bandwidth, v.stride) for v in variants]
    assert all(torch.equal(element_mask(good, p), expected[p]) for p in range(len(variants)))
    assert not all(torch.equal(element_mask(bad, p), expected[p]) for p in range(len(variants)))


def test_block_mask_expands_a_selection_over_an_order():
    order = torch.tensor([2, 0, 3, 1])  # position p holds token order[p]
    selected = torch.tensor([[True, False], [False, True]])  # blocks of 2 positions: {2, 0}, {3, 1}
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for a, b in itertools.product((2, 0), (2, 0)):
        expected[a, b] = True
    for a, b in itertools.product((3, 1), (3, 1)):
        expected[a, b] = True
    assert torch.equal(masks.block_mask(order, selected, 2, 2), expected)


def test_dense_mask_is_all_ones():
    layout = VideoLayout(2, 3, 4, prefix=2)
    assert masks.pattern_mask(layout, Pattern.DENSE).all()
    assert masks.pattern_mask(layout, Pattern.DENSE, rows=torch.tensor([1, 5])).shape == (2, layout.seq_len)


def test_real_shape_plan_density_near_half():
    table = build_plan_table(VideoLayout(13, 30, 45, prefix=226), variants_for(RainFusionConfig()))
    density = table.density()
    assert 0.4 < density.min() and density.max() < 0.6


def test_row_masks_are_rows_of_the_full_masks():
    layout = VideoLayout(3, 5, 6, prefix=4, suffix=2)
    rows = torch.tensor([0, 3, 4, 17, 50, 93, 95])
    assert torch.equal(masks.spatial_mask(layout, 0.25, rows=rows), masks.spatial_mask(layout, 0.25)[rows])
    assert torch.equal(masks.temporal_mask(layout, 0.125, rows=rows), masks.temporal_mask(layout, 0.125)[rows])
    assert torch.equal(masks.textural_mask(layout, 3, rows=rows), masks.textural_mask(layout, 3)[rows])
