"""RainFusion 2.0: tile permutation, block-mean plans, forced blocks, image models."""

import math

import pytest
import torch
import torch.nn.functional as F

import rf_compile
from rf_compile import RainFusionConfig, VideoLayout, sparse_attention
from rf_compile.ops import v2
from rf_compile.plan import element_mask

LAYOUTS = [
    VideoLayout(5, 6, 9, prefix=7, suffix=3),
    VideoLayout(4, 9, 10),
    VideoLayout(1, 7, 11, suffix=5),
    VideoLayout(3, 4, 4, prefix=2),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("tile", [(2, 2, 4), (2, 4, 2), (1, 4, 4)])
def test_tile_order_is_a_permutation_that_round_trips(layout, tile):
    order = v2.tile_order(layout, tile, sink_frames=1 if layout.frames > 1 else 0)
    assert sorted(order.tolist()) == list(range(layout.seq_len))
    text = list(range(layout.prefix)) + list(range(layout.prefix + layout.video_tokens, layout.seq_len))
    assert order[: layout.prefix].tolist() + order[layout.seq_len - layout.suffix :].tolist() == text
    x = torch.randn(2, 3, layout.seq_len, 4)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(layout.seq_len)
    assert torch.equal(x[:, :, order][:, :, inverse], x)


def test_whole_tiles_are_compact_boxes():
    layout = VideoLayout(5, 8, 12)
    tile = (2, 4, 4)
    order = v2.tile_order(layout, tile, sink_frames=1) - layout.prefix
    frame, h, w = order // 96, (order % 96) // 12, order % 12
    # The sink frame (8x12 -> two 4x... image tiles of 32 tokens come first), then 2x4x4 tiles.
    start = 96  # after frame 0
    for block in range(start, start + 2 * 96 - 32, 32):
        f_, h_, w_ = frame[block : block + 32], h[block : block + 32], w[block : block + 32]
        extents = (int(f_.max() - f_.min()) + 1, int(h_.max() - h_.min()) + 1, int(w_.max() - w_.min()) + 1)
        assert extents == tile, block
    assert set(frame[:96].tolist()) == {0}


def reference_block_means(x, order, block):
    """Per-block means of x in ``order``, written out block by block."""
    permuted = x[:, :, order].double()
    return torch.stack(
        [permuted[:, :, s : s + block].mean(2) for s in range(0, x.shape[2], block)], dim=2
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_block_means_equal_reference(layout):
    from rf_compile.kernels.block_mean import block_means as triton_block_means

    sinks = 1 if layout.frames > 1 else 0
    order = v2.tile_order(layout, (2, 2, 4), sinks)
    x = torch.randn(2, 3, layout.seq_len, 8, dtype=torch.float64)
    expected = reference_block_means(x, order, 16)
    pooling = v2.pooling_matrix(layout, (2, 2, 4), sinks, 16)
    torch.testing.assert_close(torch.matmul(pooling.double(), x), expected)
    x = torch.randn(2, 3, layout.seq_len, 24).transpose(1, 2).contiguous().transpose(1, 2)  # diffusers strides
    torch.testing.assert_close(triton_block_means(x, order, 16).double(), reference_block_means(x, order, 16))
    blocks = -(-layout.seq_len // 16)
    out = torch.empty(2, 3, 24, blocks).transpose(-1, -2)  # [D, M] memory, as v2 writes key means
    assert triton_block_means(x, order, 16, out) is out
    torch.testing.assert_close(out.double(), reference_block_means(x, order, 16))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("select", ["topk", "mass"])
def test_plans_keep_sink_text_and_diagonal_and_respect_the_budget(layout, select):
    tile = (2, 2, 4) if layout.frames > 1 else (1, 4, 4)
    config = RainFusionConfig(mode="v2", sparsity=0.7, select=select, mass=0.5, tile=tile, sink_frames=1)
    q, k = torch.randn(2, 3, layout.seq_len, 16), torch.randn(2, 3, layout.seq_len, 16)
    table = v2.predict_plan(q, k, layout, config, block=16)
    blocks = table.to_dense()  # [B*H, M, M]
    M = blocks.shape[-1]
    sinks = v2.sink_frame_count(layout, config)
    pos = torch.arange(layout.seq_len)
    always = (pos < layout.prefix + sinks * layout.frame_tokens) | (pos >= layout.prefix + layout.video_tokens)
    forced = torch.zeros(M, dtype=torch.bool)
    forced[(pos[always] // 16).unique()] = True
    assert blocks[:, forced, :].all() and blocks[:, :, forced].all()
    assert blocks[:, torch.arange(M), torch.arange(M)].all()
    # The forced blocks count inside the budget: a row keeps at most ceil(M * 0.3) blocks, or just its forced ones.
    budget = math.ceil(M * 0.3)
    forced_per_row = (forced[None, :] | forced[:, None] | torch.eye(M, dtype=torch.bool)).sum(-1)
    assert (blocks.sum(-1) <= torch.clamp(forced_per_row, min=budget)).all()
    if select == "topk":
        assert (blocks.sum(-1) == torch.clamp(forced_per_row, min=budget)).all()


@pytest.mark.parametrize("order", ["tiles", "tokens"])
def test_topk_keeps_the_forced_then_the_highest_predicted_blocks(order):
    layout = VideoLayout(4, 8, 8, prefix=5)
    config = RainFusionConfig(mode="v2", sparsity=0.75, tile=(2, 2, 4), sink_frames=0, order=order)
    q, k = torch.randn(1, 2, layout.seq_len, 16), torch.randn(1, 2, layout.seq_len, 16)
    table = v2.predict_plan(q, k, layout, config, block=16)
    blocks = table.to_dense().view(1, 2, *table.to_dense().shape[-2:])
    positions = v2.tile_order(layout, (2, 2, 4), 0) if order == "tiles" else torch.arange(layout.seq_len)
    scores = reference_block_means(q, positions, 16) @ reference_block_means(k, positions, 16).transpose(-1, -2)
    M = scores.shape[-1]
    keep = math.ceil(M * 0.25)
    text_block = torch.zeros(M, dtype=torch.bool)
    text_block[0] = True  # the 5 text tokens lie in the first block, in both orders
    forced = text_block[:, None] | text_block[None, :] | torch.eye(M, dtype=torch.bool)
    for h in range(2):
        for row in range(M):
            if forced[row].all():
                assert blocks[0, h, row].all()
                continue
            free = (~forced[row]).nonzero().flatten()
            best = free[scores[0, h, row, free].topk(keep - int(forced[row].sum())).indices]
            expected = forced[row].clone()
            expected[best] = True
            assert torch.equal(blocks[0, h, row], expected), (h, row)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_v2_output_equals_sdpa_under_its_plan_mask(layout):
    config = RainFusionConfig(mode="v2", sparsity=0.6, tile=(2, 2, 4) if layout.frames > 1 else (1, 4, 4))
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16, dtype=torch.float64) for _ in range(3))
    table = v2.predict_plan(q, k, layout, config, block=16)
    from rf_compile.ops.executors import run_plan

    out = run_plan(q, k, v, table, torch.arange(4).view(2, 2), None, None, "reference")
    order = v2.tile_order(layout, config.tile, v2.sink_frame_count(layout, config))
    position = torch.empty_like(order)
    position[order] = torch.arange(layout.seq_len)
    for b in range(2):
        for h in range(2):
            blocks = table.to_dense()[b * 2 + h]
            mask = blocks[position[:, None] // 16, position[None, :] // 16]
            assert torch.equal(element_mask(table, b * 2 + h), mask)
            expected = F.scaled_dot_product_attention(q[b, h], k[b, h], v[b, h], attn_mask=mask)
            torch.testing.assert_close(out[b, h], expected)


def test_zero_sparsity_is_dense():
    layout = VideoLayout(3, 4, 6, prefix=5)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
    out = sparse_attention(q, k, v, layout, config=RainFusionConfig(mode="v2", sparsity=0.0))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_images_get_real_sparsity_and_no_sink_by_default():
    layout = VideoLayout(1, 16, 16, suffix=8)
    config = RainFusionConfig(mode="v2", sparsity=0.75)
    assert v2.sink_frame_count(layout, config) == 0
    assert v2.default_tile(layout, 16) == (1, 4, 4)
    q, k = torch.randn(1, 2, layout.seq_len, 16), torch.randn(1, 2, layout.seq_len, 16)
    table = v2.predict_plan(q, k, layout, RainFusionConfig(mode="v2", sparsity=0.75, tile=(1, 4, 4)), block=16)
    assert table.density().max() < 0.6


def test_tile_must_fill_a_block():
    layout = VideoLayout(3, 8, 8)
    q = torch.randn(1, 1, layout.seq_len, 16)
    with pytest.raises(ValueError, match=r"'tile' \(2, 2, 2\) holds 8 tokens; a kernel block holds 16"):
        v2.predict_plan(q, q, layout, RainFusionConfig(mode="v2", tile=(2, 2, 2)), block=16)


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(2, 4, 16, 12),
        encoder_hidden_states=torch.randn(2, 9, 32),
        pooled_projections=torch.randn(2, 16),
        timestep=torch.tensor([500.0, 500.0]),
    )
    return model, inputs


def test_image_transformer_sites_get_single_frame_layouts():
    model, inputs = tiny_sd3()
    # The sites and layouts come from the passes: the rewritten graph runs without inductor's cold compile.
    report = rf_compile.inspect(model, **inputs, options={"mode": "v2", "min_video_tokens": 0, "compiler": "eager"})
    assert [s.layout for s in report.sparse] == [VideoLayout(1, 8, 6, suffix=9)] * 2
    v1 = rf_compile.inspect(model, **inputs, options={"min_video_tokens": 0, "compiler": "eager"})
    assert all(s.status == "dense" and "single-frame" in s.reason for s in v1.sites)


def test_v2_stats_report_block_density():
    rf_compile.reset()
    model, inputs = tiny_sd3()
    options = {"mode": "v2", "min_video_tokens": 0, "dense_warmup": 0.0, "compiler": "eager"}  # first call sparse
    report = rf_compile.inspect(model, **inputs, options=options)
    site = rf_compile.stats(model)[report.sparse[0].name]
    assert site["sparse_calls"] == 1 and site["density"] == 1.0  # 57 tokens: one 128-token block
    assert [h["block_density"] for h in site["heads"]] == [1.0, 1.0]


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=str)
def test_token_order_plans_are_blocks_of_the_model_order_read_in_place(layout):
    config = RainFusionConfig(mode="v2", sparsity=0.6, order="tokens")
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, dtype=torch.float64) for _ in range(3))
    table = v2.predict_plan(q, k, layout, config, block=16)
    assert table.q_order.eq(0).all() and table.kv_order.eq(0).all()  # order 0: the kernel reads in place
    from rf_compile.ops.executors import run_plan

    out = run_plan(q, k, v, table, torch.arange(2).view(1, 2), None, None, "reference")
    of = torch.arange(layout.seq_len) // 16
    for h in range(2):
        mask = table.to_dense()[h][of[:, None], of[None, :]]  # blocks of consecutive tokens
        assert torch.equal(element_mask(table, h), mask)
        torch.testing.assert_close(out[0, h], F.scaled_dot_product_attention(q[0, h], k[0, h], v[0, h], attn_mask=mask))


def reference_shared(scores, forced, keep, floor, budget):
    """Brute force, float64: floor blocks per row first (forced ones ranking highest), then the pooled
    budget (heads: per query row; call: per batch element) filled by descending probability."""
    scores = scores.double()
    B, H, M, Mk = scores.shape
    chosen = torch.zeros(B, H, M, Mk, dtype=torch.bool)
    total_of_row = [max(keep, int(forced[row].sum())) for row in range(M)]
    groups = [[(b, row)] for b in range(B) for row in range(M)] if budget == "heads" else [
        [(b, row) for row in range(M)] for b in range(B)
    ]
    for group in groups:
        candidates, total = [], 0
        for b, row in group:
            total += H * total_of_row[row]
            for h in range(H):
                order = sorted(range(Mk), key=lambda j: (not forced[row, j], -scores[b, h, row, j].item()))
                for rank, j in enumerate(order):
                    if forced[row, j] or rank < floor:
                        chosen[b, h, row, j] = True
                    else:
                        candidates.append((scores[b, h, row, j].item(), b, h, row, j))
        room = total - sum(int(chosen[b, :, row].sum()) for b, row in group)
        for _, b, h, row, j in sorted(candidates, reverse=True)[:room]:
            chosen[b, h, row, j] = True
    return chosen


@pytest.mark.parametrize("budget", ["heads", "call"])
def test_shared_budget_keeps_the_pooled_best_blocks_at_the_same_total(budget):
    from rf_compile.ops.shared_budget import floor_count, select_shared

    torch.manual_seed(0)
    B, H, M = 2, 3, 6
    # Heads of unequal sharpness, so that pooling moves blocks between them.
    logits = torch.randn(B, H, M, M) * torch.tensor([8.0, 2.0, 0.1]).view(1, H, 1, 1)
    scores = torch.softmax(logits, dim=-1)
    forced = torch.eye(M, dtype=torch.bool)
    forced[0] = True  # a text row, forced whole
    forced[:, 0] = True
    config = RainFusionConfig(mode="v2", sparsity=0.5, budget=budget, budget_floor=0.4)
    keep = v2.keep_count(M, config)
    chosen = select_shared(scores, config, forced, keep)
    expected = reference_shared(scores, forced, keep, floor_count(keep, config), budget)
    assert torch.equal(chosen, expected)
    per_row_total = B * H * sum(max(keep, int(forced[row].sum())) for row in range(M))
    assert int(chosen.sum()) == per_row_total  # the same density as per-row top-k


@pytest.mark.parametrize(("blocks", "sparsity", "keep"), [(10, 0.7, 3), (20, 0.9, 2), (48, 0.7, 15), (10, 0.75, 3)])
def test_keep_count_is_the_ceiling_of_the_exact_share(blocks, sparsity, keep):
    """``ceil(M * (1 - sparsity))`` of the decimal numbers: ``1 - 0.7`` in floating point is a hair over 0.3."""
    assert v2.keep_count(blocks, RainFusionConfig(mode="v2", sparsity=sparsity)) == keep
    assert keep == -(-blocks * round((1 - sparsity) * 100) // 100)  # the same in integers


@pytest.mark.parametrize("budget", ["heads", "call"])
def test_shared_budget_plans_keep_more_predicted_mass_at_the_same_density(budget):
    """What pooling the budget is for: at the same number of kept blocks, the predicted probability
    mass the call keeps (recomputed here from independent block means) is at least per-row top-k's."""
    layout = VideoLayout(4, 8, 8, prefix=5)
    torch.manual_seed(2)
    q, k = torch.randn(2, 3, layout.seq_len, 16), torch.randn(2, 3, layout.seq_len, 16)
    q[:, 0] *= 4.0  # a sharp head beside flatter ones
    positions = torch.arange(layout.seq_len)
    pooled_q, pooled_k = (reference_block_means(x.double(), positions, 16) for x in (q, k))
    probs = torch.softmax(pooled_q @ pooled_k.transpose(-1, -2) / 4.0, dim=-1).reshape(6, *pooled_q.shape[-2:][:1], -1)
    kept = {}
    for name in ("query_block", budget):
        config = RainFusionConfig(mode="v2", sparsity=0.7, order="tokens", budget=name, budget_floor=0.1)
        blocks = v2.predict_plan(q, k, layout, config, block=16).to_dense()
        kept[name] = (int(blocks.sum()), float(probs[blocks].sum()))
    assert kept[budget][0] == kept["query_block"][0]
    assert kept[budget][1] > kept["query_block"][1]
