"""The cost model: which call shapes stay dense, what it says, and that a kept-dense site is SDPA.

The model prices the Triton kernel only; on CPU (the reference kernel) tests opt in by giving it the
Hopper constants for any device (``priced``), and get a fresh verdict cache so nothing leaks out.
"""

import re

import pytest
import torch
import torch.nn.functional as F

import rf_compile
from rf_compile import RainFusionConfig, VideoLayout
from rf_compile.ops import cost, v2
from rf_compile.ops.attention import attention
from rf_compile.ops.runtime.sites import register_site
from rf_compile.plan import variants_for
from rf_compile.presets import build_preset
from rf_compile.reference import masks

SMALL = VideoLayout(3, 48, 48)  # issue 23's 6,912 tokens
WAN_480P = VideoLayout(21, 30, 52)  # 32,760 tokens


@pytest.fixture
def priced(monkeypatch):
    """Price every call as on a Hopper GPU, the reference kernel on CPU included."""
    monkeypatch.setattr(cost, "costs_for", lambda device, kernel: cost.HOPPER)
    monkeypatch.setattr(cost, "_VERDICTS", {})


def test_dense_time_is_the_flop_count_at_the_measured_rate():
    est = cost.estimate(RainFusionConfig(), SMALL, 2, 8, 128, cost.HOPPER)
    flops = 4 * 2 * 8 * 6912**2 * 128
    assert est.dense_ms == pytest.approx(flops / 621e12 * 1e3)
    assert cost.HOPPER.tflops(64) == 428.0 and cost.HOPPER.tflops(96) == 428.0


@pytest.mark.parametrize("mode", ["v1", "v1+", "v2"])
def test_small_shape_stays_dense_and_says_why(mode):
    est = cost.estimate(RainFusionConfig(mode=mode), SMALL, 2, 8, 128, cost.HOPPER)
    assert est.ratio > 1 and not est.sparse_pays
    assert re.fullmatch(r"sparse would be slower at 6,912 tokens \(est\. \d+\.\d\dx dense on H100/H200\)",
                        est.describe())  # fmt: skip


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_large_shape_runs_sparse(mode):
    est = cost.estimate(RainFusionConfig(mode=mode), WAN_480P, 2, 40, 128, cost.HOPPER)
    # attention_final.md measured 0.48x (v1 mix) and 0.33x (v2) of dense at this shape
    assert est.sparse_pays and est.ratio < 0.65
    assert est.describe().startswith("sparse at 32,760 tokens (est. 0.")


def test_v1_bound_is_the_densest_variant_of_the_paper_masks():
    layout = VideoLayout(5, 16, 24, prefix=40)  # 1,960 tokens: 16 blocks of 128
    config = RainFusionConfig(mode="v1+")
    element = [masks.pattern_mask(layout, v.pattern, v.bandwidth, v.stride).float().mean().item()
               for v in variants_for(config)]  # fmt: skip
    bound = cost.v1_density_bound(layout, config)
    # blocks cover their elements: at least the densest mask, at most one 128-block ring more
    assert max(element) <= bound <= max(element) + 2 * 128 / layout.seq_len + 0.05
    assert variants_for(config)[element.index(max(element))].bandwidth == 0.5


def test_v2_bound_holds_for_predicted_plans():
    layout = VideoLayout(6, 16, 32, suffix=100)  # 3,172 tokens: 25 blocks, text last
    config = RainFusionConfig(mode="v2")
    bound = cost.v2_density_bound(layout, config)
    torch.manual_seed(0)
    for _ in range(3):
        q, k = (torch.randn(2, 3, layout.seq_len, 32) for _ in range(2))
        achieved = v2.predict_plan(q, k, layout, config).density().max().item()
        assert achieved <= bound + 1e-6
    assert bound < achieved + 0.15  # a bound, not a guess far above what plans keep


def test_v1_with_predicted_heads_pays_for_the_arm_and_the_prediction():
    """v1's default predicts a plan for every head besides running the ARM: its per-call cost is its own
    measured constant plus v2's prediction per row, and its kept-block bound the larger of the band variants'
    and the predicted share's."""
    paper, blocks = RainFusionConfig(textural="checkerboard"), RainFusionConfig()
    flat = RainFusionConfig(mode="v2", sparsity=1 - blocks.nonlocal_density, order="tokens", sparsity_ramp=0)
    for layout in (SMALL, WAN_480P):
        est, est_paper, est_v2 = (cost.estimate(c, layout, 2, 12, 128, cost.HOPPER) for c in (blocks, paper, flat))
        prediction = est_v2.sparse_ms - est_v2.dense_ms * est_v2.density / cost.HOPPER.efficiency
        fixed = est.sparse_ms - est.dense_ms * est.density / cost.HOPPER.efficiency
        per_row = prediction - cost.HOPPER.v2_call_ms
        assert fixed == pytest.approx(cost.HOPPER.nonlocal_call_ms + per_row)
        assert est.density == pytest.approx(max(est_paper.density, est_v2.density))


@pytest.mark.parametrize(("tokens", "grid", "measured"), [(6912, (3, 48, 48), 0.62), (14040, (9, 30, 52), 1.10)])
def test_v1_default_decides_as_measured_on_the_h100(tokens, grid, measured):
    """The H100 crossover of v1's default with the cost model off (Wan2.1-1.3B heads, CFG batch 2): sparse
    lost at 6,912 tokens (0.62x inductor a step) and won at 14,040 (1.10x); the model keeps the first dense."""
    est = cost.estimate(RainFusionConfig(), VideoLayout(*grid), 2, 12, 128, cost.HOPPER)
    assert est.tokens == tokens and est.sparse_pays == (measured > 1)


def test_reference_kernel_is_not_judged():
    q = torch.randn(1, 8, SMALL.seq_len, 128)
    assert cost.costs_for(q.device, "reference") is None
    assert cost.dense_reason(RainFusionConfig(), SMALL, q, "reference") is None


def test_option_turns_the_decision_off(priced):
    q = torch.randn(1, 8, SMALL.seq_len, 128)
    assert cost.dense_reason(RainFusionConfig(), SMALL, q, "triton").startswith("sparse would be slower")
    assert cost.dense_reason(RainFusionConfig(cost_model=False), SMALL, q, "triton") is None
    with pytest.raises(ValueError, match="'cost_model' must be True or False"):
        RainFusionConfig(cost_model="off")


def _op_call(config: RainFusionConfig, name: str):
    layout = VideoLayout(3, 5, 7, prefix=4)
    key = register_site(name, layout, config)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 16) for _ in range(3))
    return key, (q, k, v), attention(q, k, v, None, None, None, None, None, key, [])


def test_kept_dense_site_computes_sdpa_and_stats_say_why(priced):
    key, (q, k, v), out = _op_call(RainFusionConfig(dense_warmup=0.0), "cost.kept_dense")
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    entry = rf_compile.stats()[key]
    assert entry["sparse_calls"] == 0
    (reason,) = entry["dense_shapes"]
    assert re.fullmatch(r"sparse would be slower at 109 tokens \(est\. [\d.]+x dense on H100/H200\)", reason)


def test_a_shape_judged_dense_is_not_judged_again(priced, monkeypatch):
    """The op judges a call shape once per site: later calls of the shape cost one lookup (no layout, kernel or
    price), still compute SDPA and are counted; another shape is judged on its own."""
    judged = []
    monkeypatch.setattr(cost, "dense_reason", lambda *args: judged.append(args[1].seq_len) or "priced dense")
    layout = VideoLayout(3, 5, 7, prefix=4)
    key = register_site("cost.judged_once", layout, RainFusionConfig(dense_warmup=0.0))
    for batch in (2, 2, 2, 1):
        q, k, v = (torch.randn(batch, 3, layout.seq_len, 16) for _ in range(3))
        out = attention(q, k, v, None, None, None, None, None, key, [])
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert judged == [layout.seq_len, layout.seq_len]  # batch 2 once, then batch 1
    assert rf_compile.stats()[key]["dense_shapes"] == {"priced dense": 4}
    with pytest.raises(ValueError, match="equal B, H, N"):  # a judged q shape does not skip the check of v's
        attention(q, k, v[:, :2], None, None, None, None, None, key, [])


def test_site_with_the_option_off_runs_sparse(priced):
    key, (q, k, v), out = _op_call(RainFusionConfig(dense_warmup=0.0, cost_model=False, textural="checkerboard"),
                                 "cost.forced_sparse")  # the checkerboard: sparse inside one block
    entry = rf_compile.stats()[key]
    assert entry["sparse_calls"] == 1 and entry["dense_shapes"] == {}
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-4)


def test_static_shape_leaves_sdpa_in_the_graph_and_the_report_says_why(priced):
    from torch._dynamo.utils import counters

    preset = build_preset("wan", "tiny")
    counters.clear()
    report = rf_compile.inspect(preset.model, *preset.args, options={"min_video_tokens": 0}, **preset.kwargs)
    video = [site for site in report.sites if site.seq_len == site.kv_len]
    assert video and all(site.status == "dense" for site in video)
    assert all(re.fullmatch(r"sparse would be slower at 72 tokens \(est\. [\d.]+x dense on H100/H200\)",
                            site.reason) for site in video)  # fmt: skip
    # Nothing rewritten: inductor gets the graph with its SDPA, as with backend="inductor"
    assert counters["rainfusion"]["sparse_sites"] == 0 and rf_compile.stats(preset.model) == {}


@pytest.mark.gpu
def test_gpu_small_shape_stays_dense_large_runs_sparse():
    reports = {}
    for latent in ((2, 32, 64), (21, 60, 104)):  # 1,024 and 32,760 tokens, Wan2.1-1.3B's 12 heads of 128
        preset = build_preset("wan1.3b", "full", batch=2, device="cuda", dtype=torch.bfloat16, layers=1, latent=latent)
        report = rf_compile.inspect(preset.model, *preset.args, **preset.kwargs)
        reports[latent] = [site for site in report.sites if site.seq_len == site.kv_len]
        del preset
    (small,), (large,) = reports.values()
    assert small.status == "dense" and small.reason.startswith("sparse would be slower at 1,024 tokens")
    assert large.status == "sparse", large.reason


@pytest.mark.gpu
def test_gpu_pricing_a_new_shape_never_waits_for_the_device():
    layout = VideoLayout(2, 16, 32)  # 1,024 tokens: priced dense
    key = register_site("cost.gpu_nosync", layout, RainFusionConfig(dense_warmup=0.0))
    q, k, v = (torch.randn(2, 12, layout.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the first call of the shape: priced on the host, then dense SDPA
        out = attention(q, k, v, None, None, None, None, None, key, [])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert list(rf_compile.stats()[key]["dense_shapes"])[0].startswith("sparse would be slower at 1,024 tokens")


def test_shape_bound_is_the_per_call_cost_against_dense(priced):
    """Dense at any layout where v1's per-call cost (0.80 ms) is above 0.9x dense: 1,024 tokens (0.03 ms dense
    at 2 x 12 heads of 128), not 32,760 (21 ms), and never with the cost model off."""
    config = RainFusionConfig()
    small, large = (torch.empty(2, 12, n, 128) for n in (1024, WAN_480P.seq_len))
    reason = cost.shape_dense_reason(config, small, "triton")
    assert re.fullmatch(r"sparse would be slower at 1,024 tokens whatever the layout \(est\. its per-call cost "
                        r"alone [\d.]+x dense on H100/H200\)", reason)  # fmt: skip
    assert cost.shape_dense_reason(config, large, "triton") is None
    assert cost.shape_dense_reason(RainFusionConfig(cost_model=False), small, "triton") is None


def test_regional_graph_too_short_at_any_layout_keeps_sdpa(priced):
    """Regional block graphs learn their layout at the call: a shape too short for any layout keeps its SDPA
    (no op left to decide dense at every call), and the report says why."""
    from torch._dynamo.utils import counters

    from rf_compile.backend import compiled_graphs, reports_since

    preset = build_preset("wan", "tiny")
    model = preset.model
    with torch.no_grad():
        eager = model(*preset.args, **preset.kwargs)[0]
    torch._dynamo.reset()
    rf_compile.reset()
    counters.clear()
    start = compiled_graphs()
    model.compile_repeated_blocks(backend="rainfusion", options={"min_video_tokens": 0})
    with torch.no_grad():
        torch.testing.assert_close(model(*preset.args, **preset.kwargs)[0], eager, atol=1e-5, rtol=1e-5)
    video = [site for report in reports_since(start) for site in report.sites
             if site.seq_len == site.kv_len]  # fmt: skip
    assert video and all(site.status == "dense" for site in video)
    assert all("whatever the layout" in site.reason for site in video)
    assert counters["rainfusion"]["sparse_sites"] == 0 and rf_compile.stats(model) == {}
