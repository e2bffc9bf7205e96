"""The op and the functional layer against F.scaled_dot_product_attention."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rf_compile import Pattern, RainFusionConfig, VideoLayout, classify_heads, sparse_attention
from rf_compile.ops.attention import attention
from rf_compile.ops.masks import key_padding_bias
from rf_compile.ops.runtime.sites import register_site
from rf_compile.ops.runtime.stats import reset, stats
from rf_compile.ops.torch_attention import torch_sparse_attention as sparse_attention_reference
from rf_compile.ops.v2 import nonlocal_config
from rf_compile.plan import build_plan_table, variants_for
from rf_compile.reference import masks
from rf_compile.reference.synthetic import planted_qk

ODD_LAYOUTS = [VideoLayout(3, 5, 7, prefix=5), VideoLayout(2, 3, 7, suffix=3), VideoLayout(3, 3, 5, prefix=1, suffix=2)]


def qkv(layout, batch=2, heads=3, dim=24, dtype=torch.float32):
    return [torch.randn(batch, heads, layout.seq_len, dim, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("layout", ODD_LAYOUTS, ids=str)
def test_full_masks_equal_sdpa(layout):
    q, k, v = qkv(layout)
    # bandwidth 1 makes the spatial and temporal bands full; a tiny alpha makes every head temporal.
    config = RainFusionConfig(bandwidth=1.0, alpha=1e-6)
    out = sparse_attention(q, k, v, layout, config=config)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ODD_LAYOUTS, ids=str)
def test_sparse_output_equals_sdpa_with_the_chosen_pattern_as_additive_mask(layout):
    patterns = [Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.TEXTURAL]
    q, k = planted_qk(layout, patterns, head_dim=32, batch=2, seed=5, dtype=torch.float64)
    v = torch.randn_like(q)
    paper = RainFusionConfig(textural="checkerboard")  # the paper's three masks and its ARM threshold, 0.8
    out = sparse_attention(q, k, v, layout, scale=0.2, config=paper)
    chosen = classify_heads(q, k, layout, paper)
    pattern_masks = {
        Pattern.SPATIAL: masks.spatial_mask(layout, 0.25),
        Pattern.TEMPORAL: masks.temporal_mask(layout, 0.25),
        Pattern.TEXTURAL: masks.textural_mask(layout, 2),
    }
    for b in range(2):
        for h in range(3):
            mask = pattern_masks[Pattern(int(chosen[b, h]))]
            bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
            expected = F.scaled_dot_product_attention(q[b, h], k[b, h], v[b, h], attn_mask=bias, scale=0.2)
            torch.testing.assert_close(out[b, h], expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_rank_shards_compute_the_canonical_sequence_in_their_order(mode):
    """A layout in rank shards holds the unsharded layout's tokens laid [prefix_0, video_0, suffix_0, prefix_1, ...]:
    its output is the unsharded output in that order, key padding included."""
    layout = VideoLayout(4, 16, 16, prefix=4, suffix=6, shards=2)  # 9 kernel blocks: v2 plans are sparse
    canonical = dataclasses.replace(layout, shards=1)
    parts = torch.arange(canonical.seq_len).split([4, 1024, 6])
    where = torch.cat([part.chunk(2)[r] for r in range(2) for part in parts])  # the token at each position
    q, k, v = qkv(canonical)
    mask = torch.zeros(2, 1, 1, canonical.seq_len)
    mask[0, ..., -3:] = float("-inf")
    config = RainFusionConfig(mode=mode)
    expected = sparse_attention(q, k, v, canonical, config=config, attn_mask=mask)
    out = sparse_attention(*(t[:, :, where] for t in (q, k, v)), layout, config=config, attn_mask=mask[..., where])
    torch.testing.assert_close(out, expected[:, :, where], atol=1e-6, rtol=1e-6)
    assert (expected - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() > 1e-3  # not dense


def test_reference_honours_boolean_key_padding_mask_and_float_masks():
    layout = VideoLayout(2, 4, 4, suffix=6)
    q, k, v = qkv(layout, batch=2)
    table = build_plan_table(layout, variants_for(RainFusionConfig()))
    variant = torch.tensor([[0, 1, 2], [2, 1, 0]])
    padding = torch.ones(2, 1, 1, layout.seq_len, dtype=torch.bool)
    padding[1, ..., -3:] = False
    out_bool = sparse_attention_reference(q, k, v, table, variant, attn_mask=padding)
    additive = torch.zeros(padding.shape).masked_fill(~padding, float("-inf"))
    out_float = sparse_attention_reference(q, k, v, table, variant, attn_mask=additive)
    torch.testing.assert_close(out_bool, out_float)
    # Padded keys get no weight: changing their values changes nothing.
    v2 = v.clone()
    v2[1, :, -3:] += 100
    torch.testing.assert_close(sparse_attention_reference(q, k, v2, table, variant, attn_mask=padding), out_bool)
    bias = key_padding_bias(padding, 2, layout.seq_len)
    assert bias.shape == (2, layout.seq_len) and torch.isinf(bias[1, -3:]).all() and (bias[0] == 0).all()


def test_dense_mode_is_exact_sdpa():
    layout = ODD_LAYOUTS[0]
    q, k, v = qkv(layout)
    out = sparse_attention(q, k, v, layout, config=RainFusionConfig(mode="dense"))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)


def test_op_warmup_follows_the_timestep_and_records_stats():
    reset()
    layout = VideoLayout(3, 4, 4, prefix=4)
    # The paper's v1: its checkerboard is sparse inside the one kernel block of this layout (predicted blocks
    # would keep it whole).
    config = RainFusionConfig(dense_warmup=0.2, num_steps=5, textural="checkerboard")
    key = register_site("test.warmup", layout, config)
    q, k, v = qkv(layout)
    dense = F.scaled_dot_product_attention(q, k, v)
    out_early = attention(q, k, v, None, None, torch.tensor([950.0, 950.0]), None, None, key, [])
    torch.testing.assert_close(out_early, dense)
    out_late = attention(q, k, v, None, None, torch.tensor([300.0, 300.0]), None, None, key, [])
    expected = sparse_attention(q, k, v, layout, config=config)
    torch.testing.assert_close(out_late, expected)
    site = stats()["test.warmup"]
    assert (site["calls"], site["dense_calls"], site["sparse_calls"], site["arm_runs"]) == (2, 1, 1, 1)
    assert sum(sum(head[p] for p in ("spatial", "temporal", "textural")) for head in site["heads"]) == 2 * 3
    assert 0.0 < site["sparsity"] < 1.0


def test_op_without_timestep_counts_calls_and_reset_restarts():
    reset()
    layout = VideoLayout(2, 4, 4)
    key = register_site("test.counter", layout, RainFusionConfig(dense_warmup=0.1, num_steps=20))
    q, k, v = qkv(layout, batch=1)
    for _ in range(3):
        attention(q, k, v, None, None, None, None, None, key, [])
    assert stats()["test.counter"]["dense_calls"] == 2  # ceil(0.1 * 20)
    reset()
    assert stats()["test.counter"]["calls"] == 0


def test_op_reuses_the_arm_decision_with_arm_every():
    reset()
    layout = VideoLayout(2, 4, 4)
    key = register_site("test.arm_every", layout, RainFusionConfig(dense_warmup=0.0, arm_every=3))
    q, k, v = qkv(layout, batch=1)
    for _ in range(4):
        attention(q, k, v, None, None, None, None, None, key, [])
    assert stats()["test.arm_every"]["arm_runs"] == 2


def test_v1_site_builds_its_predicted_heads_tensors_with_its_state(monkeypatch):
    """v1's predicted heads read v2's per-layout tensors. They are cached across calls, so they must be built
    with the site's state (outside CUDA-graph pools), not on first use inside a call that a graph warms up."""
    from rf_compile.ops import attention as attention_module
    from rf_compile.ops import v2

    layout = VideoLayout(4, 8, 16)
    q = torch.randn(2, 3, layout.seq_len, 16)
    built = []
    warm = v2.warm_static
    monkeypatch.setattr(v2, "warm_static", lambda q, layout, config: built.append(config) or warm(q, layout, config))
    for config in (RainFusionConfig(), RainFusionConfig(textural="checkerboard")):
        attention_module._prepare(q, layout, config, variants_for(config), "reference", "test.prepare")
    assert built == [nonlocal_config(RainFusionConfig())]  # the checkerboard needs none


def test_op_passes_opcheck():
    layout = VideoLayout(2, 3, 4, prefix=2)
    key = register_site("test.opcheck", layout, RainFusionConfig(dense_warmup=0.0))
    q, k, v = qkv(layout)
    torch.library.opcheck(attention, (q, k, v, None, None, None, None, None, key, []))


def test_grad_required_raises_clear_error():
    layout = VideoLayout(2, 3, 4)
    q, k, v = qkv(layout)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        sparse_attention(q, k, v, layout)


@pytest.mark.parametrize("mode", ["v1", "dense"])
def test_op_refuses_calls_that_record_gradients(mode):
    """Every call through the op that autograd would record raises (dense mode too, which never reaches the sparse
    path's own checks); under no_grad the same call runs and matches SDPA in dense mode."""
    layout = VideoLayout(2, 3, 4)
    key = register_site(f"test.grad.{mode}", layout, RainFusionConfig(mode=mode, dense_warmup=0.0))
    q, k, v = qkv(layout)
    args = (None, None, None, None, None, key, [])
    with pytest.raises(RuntimeError, match="inference-only"):
        attention(q, k, v.requires_grad_(True), *args)
    with torch.no_grad():
        out = attention(q, k, v, *args)
    assert not out.requires_grad
    if mode == "dense":
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_compiling_a_graph_that_needs_gradients_names_the_cause():
    """torch.compile traces the op's autograd kernel: a model called with gradients on fails at compile time with
    the inference-only message (no opaque "no autograd formula" from deep inside AOTAutograd)."""
    layout = VideoLayout(2, 3, 4)

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 24)

        def forward(self, x):
            q = self.proj(x).view(1, layout.seq_len, 2, 12).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q)

    model = torch.compile(Attend(), backend="rainfusion", options={"layout": layout, "min_video_tokens": 0})
    # Inductor's caches key a graph by its ops, not by their Python kernels: a graph cached while the op was
    # registered otherwise would skip the trace this test is about.
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
        pytest.raises(Exception, match="inference-only"),
    ):
        model(torch.randn(1, layout.seq_len, 24))


def test_mismatched_layout_and_shapes_raise():
    layout = VideoLayout(2, 3, 4)
    q, k, v = qkv(layout)
    with pytest.raises(ValueError, match="has 24"):
        sparse_attention(q, k, v, VideoLayout(2, 3, 5))
    with pytest.raises(ValueError, match="self-attention"):
        sparse_attention(q, k[:, :, :10], v, layout)


def test_unregistered_site_is_a_clear_error():
    layout = VideoLayout(2, 3, 4)
    q, k, v = qkv(layout)
    with pytest.raises(RuntimeError, match="not registered"):
        attention(q, k, v, None, None, None, None, None, "no.such.site", [])


def test_stats_report_estimated_recall_and_bandwidth_per_head():
    reset()
    layout = VideoLayout(4, 6, 6, prefix=3)
    key = register_site("test.recall", layout, RainFusionConfig(mode="v1+", dense_warmup=0.0))
    q, k = planted_qk(layout, [Pattern.TEMPORAL, Pattern.TEXTURAL], head_dim=32, seed=2)
    v = torch.randn_like(q)
    attention(q, k, v, None, None, None, None, None, key, [])
    temporal, textural = stats()["test.recall"]["heads"]
    assert temporal["temporal"] == 1 and temporal["mean_recall"] > 0.9 and temporal["mean_bandwidth"] == 0.125
    assert textural["textural"] == 1 and textural["mean_recall"] is None and textural["mean_bandwidth"] is None


def test_fp8_where_it_cannot_run_names_the_reason():
    """precision="fp8" runs on the Triton kernel with TMA loads only: the PyTorch path refuses it in
    words the user can act on (in a compiled model the site stays dense with this reason)."""
    layout = VideoLayout(2, 4, 4)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 64) for _ in range(3))
    reason = "precision='fp8' needs the Triton kernel on a Hopper GPU.*use precision='bf16'"
    with pytest.raises(ValueError, match=reason):
        sparse_attention(q, k, v, layout, config=RainFusionConfig(precision="fp8", kernel="reference"))


def _block_plan_reference(q, k, layout, keep, block=128):
    """Independent v2 plan in the model's token order, float64: text rows dense, text columns and the
    diagonal first, then the highest pooled scores up to ``keep`` blocks per query block. Bool [M, M]."""
    N, D = q.shape[-2:]
    M = -(-N // block)
    pooled_q = torch.stack([q[s : s + block].mean(0) for s in range(0, N, block)])
    pooled_k = torch.stack([k[s : s + block].mean(0) for s in range(0, N, block)])
    scores = torch.softmax(pooled_q @ pooled_k.T * D**-0.5, -1)
    video_end = layout.prefix + layout.video_tokens
    text = torch.tensor([s < layout.prefix or min(s + block, N) > video_end for s in range(0, N, block)])
    mask = torch.zeros(M, M, dtype=torch.bool)
    for row in range(M):
        if text[row]:
            mask[row] = True
            continue
        mask[row] = text.clone()
        mask[row, row] = True
        free = (~mask[row]).nonzero().flatten()
        mask[row, free[scores[row, free].topk(keep - int(mask[row].sum())).indices]] = True
    return mask


def test_textural_blocks_gives_nonlocal_heads_a_predicted_block_plan():
    """v1 with textural='blocks' (its default): heads the ARM finds local keep their band; the others attend the
    key blocks of most pooled score at the default share, ``textural_density`` 0.42 of the blocks."""
    layout = VideoLayout(8, 8, 16, prefix=8)  # 1,032 tokens: 9 blocks of 128
    patterns = [Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.TEXTURAL, None]
    q, k = planted_qk(layout, patterns, head_dim=32, batch=2, seed=3, dtype=torch.float64)
    v = torch.randn_like(q)
    # One ARM threshold for both, so that the same heads keep a band.
    base = RainFusionConfig(kernel="reference", sink_frames=0, alpha=0.8, textural="checkerboard")
    blocks = sparse_attention(q, k, v, layout, config=dataclasses.replace(base, textural=None))
    checkerboard = sparse_attention(q, k, v, layout, config=base)
    chosen = classify_heads(q, k, layout, base)
    assert (chosen == Pattern.TEXTURAL).any() and (chosen != Pattern.TEXTURAL).any()
    of = torch.arange(layout.seq_len) // 128
    for b in range(2):
        for h in range(4):
            if chosen[b, h] != Pattern.TEXTURAL:
                torch.testing.assert_close(blocks[b, h], checkerboard[b, h], atol=1e-12, rtol=1e-12)
                continue
            mask = _block_plan_reference(q[b, h], k[b, h], layout, keep=4)  # ceil(9 * 0.42), in token order
            expected = F.scaled_dot_product_attention(q[b, h], k[b, h], v[b, h], attn_mask=mask[of][:, of])
            torch.testing.assert_close(blocks[b, h], expected, atol=1e-12, rtol=1e-12)


def test_sparsity_ramp_of_v1_moves_the_predicted_heads_and_keeps_the_bands():
    """v1 with textural='blocks' and ``sparsity_ramp``: over the sparse steps the non-local heads' share of
    key blocks falls linearly around ``textural_density``; the heads the ARM finds local keep their band at
    every step."""
    reset()
    layout = VideoLayout(8, 8, 16, prefix=8)  # 1,032 tokens: 9 blocks of 128
    patterns = [Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.TEXTURAL, None]
    q, k = planted_qk(layout, patterns, head_dim=32, batch=1, seed=3, dtype=torch.float64)
    v = torch.randn_like(q)
    base = RainFusionConfig(kernel="reference", dense_warmup=0.2, num_steps=5, alpha=0.8, textural="checkerboard")
    config = dataclasses.replace(base, textural="blocks", textural_density=0.5, sparsity_ramp=0.25)
    key = register_site("test.v1_ramp", layout, config)
    outs = [attention(q, k, v, None, None, torch.tensor([t]), None, None, key, []) for t in (900.0, 700, 500, 300, 100)]
    torch.testing.assert_close(outs[0], F.scaled_dot_product_attention(q, k, v))  # the warm-up step
    bands = sparse_attention(q, k, v, layout, config=base)
    chosen = classify_heads(q, k, layout, base)[0]
    assert (chosen == Pattern.TEXTURAL).any() and (chosen != Pattern.TEXTURAL).any()
    of = torch.arange(layout.seq_len) // 128
    # Sparsity 0.25, 0.417, 0.583, 0.75 of the predicted heads' blocks: ceil(9 * density) key blocks.
    for out, keep in zip(outs[1:], (7, 6, 4, 3)):
        for h in range(4):
            if chosen[h] != Pattern.TEXTURAL:
                torch.testing.assert_close(out[0, h], bands[0, h], atol=1e-12, rtol=1e-12)
                continue
            mask = _block_plan_reference(q[0, h], k[0, h], layout, keep=keep)
            expected = F.scaled_dot_product_attention(q[0, h], k[0, h], v[0, h], attn_mask=mask[of][:, of])
            torch.testing.assert_close(out[0, h], expected, atol=1e-12, rtol=1e-12)
    assert stats()["test.v1_ramp"]["sparsity_range"] == pytest.approx([0.25, 0.75])


def test_textural_density_sets_the_share_of_the_predicted_heads():
    """v1 with textural='blocks' and ``textural_density``: the non-local heads keep ceil(M * density) key
    blocks of the float64 block plan instead of the checkerboard's half; the bands stay."""
    layout = VideoLayout(8, 8, 16, prefix=8)  # 1,032 tokens: 9 blocks of 128
    patterns = [Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.TEXTURAL, None]
    q, k = planted_qk(layout, patterns, head_dim=32, batch=1, seed=3, dtype=torch.float64)
    v = torch.randn_like(q)
    base = RainFusionConfig(kernel="reference", alpha=0.8, textural="checkerboard")
    out = sparse_attention(q, k, v, layout, config=dataclasses.replace(base, textural="blocks", textural_density=0.3))
    bands = sparse_attention(q, k, v, layout, config=base)
    chosen = classify_heads(q, k, layout, base)[0]
    of = torch.arange(layout.seq_len) // 128
    for h in range(4):
        if chosen[h] != Pattern.TEXTURAL:
            torch.testing.assert_close(out[0, h], bands[0, h], atol=1e-12, rtol=1e-12)
            continue
        mask = _block_plan_reference(q[0, h], k[0, h], layout, keep=3)  # ceil(9 * 0.3)
        expected = F.scaled_dot_product_attention(q[0, h], k[0, h], v[0, h], attn_mask=mask[of][:, of])
        torch.testing.assert_close(out[0, h], expected, atol=1e-12, rtol=1e-12)
    # A pooled budget (no per-step ramp) keeps the same share for its predicted heads.
    pooled = nonlocal_config(dataclasses.replace(base, textural="blocks", textural_density=0.3, budget="heads"))
    assert (pooled.mode, pooled.sparsity, pooled.budget) == ("v2", pytest.approx(0.7), "heads")


def test_measure_error_records_the_relative_error_against_dense_per_head():
    reset()
    layout = VideoLayout(4, 8, 8)
    config = RainFusionConfig(dense_warmup=0.0, measure_error=True, kernel="reference")
    key = register_site("test.measure_error", layout, config)
    q, k, v = qkv(layout, dim=16)
    out = attention(q, k, v, None, None, None, None, None, key, [])
    dense = F.scaled_dot_product_attention(q, k, v)
    per_head = ((out - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)).mean(0)  # [H]
    site = stats()["test.measure_error"]
    assert site["attn_rel_err"] == pytest.approx(per_head.mean().item(), rel=1e-5)
    assert [h["attn_rel_err"] for h in site["heads"]] == pytest.approx(per_head.tolist(), rel=1e-5)
    assert 0 < site["block_density"] <= 1


def test_dense_last_steps_makes_the_last_steps_of_each_video_dense():
    reset()
    layout = VideoLayout(3, 4, 4)
    config = RainFusionConfig(dense_warmup=0.2, num_steps=5, dense_last_steps=2, textural="checkerboard")
    key = register_site("test.last", layout, config)  # the checkerboard: sparse inside this layout's one block
    q, k, v = qkv(layout, batch=1)
    dense = F.scaled_dot_product_attention(q, k, v)
    steps = (900.0, 700.0, 500.0, 300.0, 100.0)
    outs = [attention(q, k, v, None, None, torch.tensor([t]), None, None, key, []) for t in steps]
    assert [torch.equal(out, dense) for out in outs] == [True, False, False, True, True]  # step 0, then 3 and 4
    assert (stats()["test.last"]["dense_calls"], stats()["test.last"]["sparse_calls"]) == (3, 2)


def test_sparsity_ramp_gives_the_early_sparse_steps_more_blocks_and_keeps_the_mean():
    """v2 with ``sparsity_ramp``: the sparse steps' budgets fall linearly from ``1 - (sparsity - ramp)`` to
    ``1 - (sparsity + ramp)`` of the key blocks; each step's output is the float64 block plan of its budget."""
    reset()
    layout = VideoLayout(8, 16, 16)  # 2,048 tokens: 16 blocks of 128
    config = RainFusionConfig(
        mode="v2", sparsity=0.5, sparsity_ramp=0.25, dense_warmup=0.2, num_steps=5, order="tokens", kernel="reference"
    )
    key = register_site("test.ramp", layout, config)
    q, k, v = qkv(layout, batch=1, heads=2, dim=16, dtype=torch.float64)
    outs = [attention(q, k, v, None, None, torch.tensor([t]), None, None, key, []) for t in (900.0, 700, 500, 300, 100)]
    torch.testing.assert_close(outs[0], F.scaled_dot_product_attention(q, k, v))  # the warm-up step
    of = torch.arange(layout.seq_len) // 128
    # Sparsity 0.25, 0.417, 0.583, 0.75 over the 4 sparse steps: ceil(16 * density) key blocks.
    for out, keep in zip(outs[1:], (12, 10, 7, 4)):
        for h in range(2):
            mask = _block_plan_reference(q[0, h], k[0, h], layout, keep=keep)
            assert mask.sum(-1).tolist() == [keep] * 16
            expected = F.scaled_dot_product_attention(q[0, h], k[0, h], v[0, h], attn_mask=mask[of][:, of])
            torch.testing.assert_close(out[0, h], expected, atol=1e-12, rtol=1e-12)
    assert stats()["test.ramp"]["block_density"] == pytest.approx((12 + 10 + 7 + 4) / 64)


def test_stats_follow_each_heads_decision_and_plan():
    """The per-call statistics (accumulated on the device in a few fused ops) against the shape state's own
    decisions: per head the pattern counts, the mean estimated recall and the block density of its plan, and the
    site's density from the plans' score densities; the dense warm-up call counts in none of them."""
    from rf_compile.ops.runtime.models import site_state
    from rf_compile.ops.runtime.sites import get_spec

    reset()
    layout = VideoLayout(4, 6, 8, prefix=5)
    patterns = [Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.TEXTURAL, Pattern.SPATIAL]
    q, k = planted_qk(layout, patterns, head_dim=32, batch=2, seed=4)
    v = torch.randn_like(q)
    config = RainFusionConfig(dense_warmup=0.5, num_steps=2, textural="checkerboard")
    key = register_site("test.stats", layout, config)
    for t in (900.0, 400.0):  # dense, then sparse
        attention(q, k, v, None, None, torch.tensor([t, t]), None, None, key, [])
    shape = next(iter(site_state(get_spec(key), None).shapes.values()))
    variant, recall, table = shape.variant, shape.recall.double(), shape.prepared
    site = stats()["test.stats"]
    assert (site["calls"], site["sparse_calls"]) == (2, 1)
    for h, head in enumerate(site["heads"]):
        chosen = [table.variants[int(p)].pattern.name.lower() for p in variant[:, h]]
        assert {name: head[name] for name in ("spatial", "temporal", "textural")} == {
            name: chosen.count(name) for name in ("spatial", "temporal", "textural")}
        known = recall[:, h][~recall[:, h].isnan()]
        assert head["mean_recall"] == (pytest.approx(float(known.mean())) if len(known) else None)
        assert head["block_density"] == pytest.approx(float(table.density()[variant[:, h]].double().mean()))
    assert site["density"] == pytest.approx(float(table.score_density[variant].double().mean()))
    assert len({name for head in site["heads"] for name in ("spatial", "temporal", "textural") if head[name]}) > 1
