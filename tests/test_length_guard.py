"""Symbolic lengths too short to be sparse at any layout: SDPA under a guard, and longer calls compile sparse.

A graph compiled with dynamic shapes serves every length its guards admit, so a decision taken at its first
(short) call must not keep a longer call dense. The floor is checked against its closed form (the positive
root of the cost model's quadratic), and the compiled paths against eager and the sites' statistics.
"""

import dataclasses
import math
import re

import pytest
import torch

import rf_compile
from rf_compile import RainFusionConfig
from rf_compile.backend import compiled_graphs, reports_since
from rf_compile.ops import cost
from rf_compile.presets import build_preset

# Passes only (no inductor: the guards are Dynamo's either way), the checkerboard: sparse at tiny sizes.
OPTIONS = {"dense_warmup": 0.0, "textural": "checkerboard", "compiler": "eager"}
SHORT, LONG = (2, 8, 8), (16, 8, 8)  # Wan tiny latents: 32 and 256 video tokens, the frame count apart


def _floor_closed_form(config: RainFusionConfig, B: int, H: int, D: int, costs: cost.DeviceCosts) -> float:
    """The positive root N of SPARSE_BELOW * dense(N) = fixed(N), dense = c N^2, fixed = a + r N."""
    c = 4 * B * H * D / (costs.tflops(D) * 1e12) * 1e3
    if config.mode == "v2":
        a, r = costs.v2_call_ms, costs.v2_ms_per_mrow * B * H / 1e6 * D / 128
    elif config.predicts_nonlocal:
        a, r = costs.nonlocal_call_ms, costs.v2_ms_per_mrow * B * H / 1e6 * D / 128
    else:
        a, r = costs.v1_call_ms, 0.0
    q = cost.SPARSE_BELOW * c
    return (r + math.sqrt(r * r + 4 * q * a)) / (2 * q)


@pytest.mark.parametrize(
    "options, B, H, D",
    [({}, 2, 12, 128), ({"mode": "v1", "textural": "checkerboard"}, 2, 12, 128), ({"mode": "v2"}, 2, 48, 64),
     ({"mode": "v1+"}, 1, 40, 128)],
)  # fmt: skip
def test_floor_is_the_root_of_the_cost_models_quadratic(options, B, H, D, monkeypatch):
    monkeypatch.setattr(cost, "costs_for", lambda device, kernel: cost.HOPPER)  # as on a Hopper GPU
    config = RainFusionConfig(**options)
    floor, why = cost.sparse_floor(config, B, H, D, torch.device("cuda"), "triton")
    assert floor == math.ceil(_floor_closed_form(config, B, H, D, cost.HOPPER))
    assert why == f"sparse would be slower below {floor:,} tokens whatever the layout (est. on H100/H200)"
    below, at = (cost.shape_dense_reason(config, torch.empty(B, H, n, D, device="meta"), "triton")
                 for n in (floor - 1, floor))  # fmt: skip
    assert below.startswith(f"sparse would be slower at {floor - 1:,} tokens") and at is None


def test_floor_is_not_judged_off_the_gpu_or_with_the_cost_model_off():
    assert cost.sparse_floor(RainFusionConfig(), 2, 12, 128, torch.device("cpu"), "reference") is None
    assert cost.sparse_floor(RainFusionConfig(), 2, 12, 128, torch.device("cpu"), "triton") is None
    assert cost.sparse_floor(RainFusionConfig(cost_model=False), 2, 12, 128, torch.device("cpu"), "triton") is None


@pytest.mark.parametrize("options, H, D", [({}, 12, 128), ({"mode": "v1", "textural": "checkerboard"}, 12, 128),
                                           ({"mode": "v2"}, 48, 64), ({"mode": "v1+"}, 40, 128)])  # fmt: skip
def test_work_floor_keeps_sdpa_only_where_no_batch_pays(options, H, D, monkeypatch):
    """A symbolic batch: the floor on batch x tokens^2 is the per-call cost with no row's share over dense per unit
    of work (closed form), never above a batch's own token floor, and equal to it for v1's paper form, whose
    fixed cost has no per-row part."""
    monkeypatch.setattr(cost, "costs_for", lambda device, kernel: cost.HOPPER)
    config = RainFusionConfig(**options)
    work, why = cost.sparse_work_floor(config, H, D, torch.device("cuda"), "triton")
    unit = 4 * H * D / (cost.HOPPER.tflops(D) * 1e12) * 1e3
    call = {"v2": cost.HOPPER.v2_call_ms}.get(config.mode, cost.HOPPER.nonlocal_call_ms if config.predicts_nonlocal
                                              else cost.HOPPER.v1_call_ms)  # fmt: skip
    assert work == math.ceil(call / (cost.SPARSE_BELOW * unit))
    assert why == f"sparse would be slower below batch x tokens^2 = {work:,} whatever the layout (est. on H100/H200)"
    for B in (1, 2, 3, 4, 8):
        tokens = math.ceil(math.sqrt(work / B))  # the least N with B N^2 >= work
        floor = cost.sparse_floor(config, B, H, D, torch.device("cuda"), "triton")[0]
        assert tokens <= floor if config.predicts_nonlocal or config.mode == "v2" else tokens == floor
    assert cost.sparse_work_floor(RainFusionConfig(cost_model=False), H, D, torch.device("cuda"), "triton") is None


def _wan(latent):
    return build_preset("wan", "tiny", latent=latent)


def _video_sites(since: int) -> list:
    return [site for report in reports_since(since) for site in report.sites if site.seq_len == site.kv_len]


def test_short_first_call_keeps_sdpa_and_a_longer_call_compiles_sparse():
    """Before the guard, the first call's 32 tokens (< min_video_tokens=256) kept every later length of the
    dynamic graph dense, with no word in the report or the statistics."""
    short, long = _wan(SHORT), _wan(LONG)
    model = short.model.eval()
    torch._dynamo.reset()
    rf_compile.reset()
    compiled = torch.compile(model, backend="rainfusion", options=OPTIONS, dynamic=True)
    with torch.no_grad():
        start = compiled_graphs()
        out = compiled(*short.args, **short.kwargs)[0]
        torch.testing.assert_close(out, model(*short.args, **short.kwargs)[0], atol=1e-5, rtol=1e-5)
        sites = _video_sites(start)
        assert sites and all(site.status == "dense" for site in sites)
        assert all(re.fullmatch(r"fewer video tokens than min_video_tokens=256 at any layout; this graph is guarded "
                                r"to calls shorter than 256 tokens \(a longer one compiles again\)", site.reason)
                   for site in sites)  # fmt: skip
        assert rf_compile.stats(model) == {}  # no op in the graph

        middle = compiled_graphs()
        compiled(*long.args, **long.kwargs)
        assert compiled_graphs() > middle  # the guard failed: compiled again
        sites = _video_sites(middle)
        assert sites and all(site.status == "sparse" for site in sites)
        stats = rf_compile.stats(model)
        assert stats and all(s["sparse_calls"] == 1 and s["dense_calls"] == 0 for s in stats.values())
        assert all(s["sparsity"] > 0 for s in stats.values())

        again = compiled_graphs()  # both graphs kept: a short call takes the SDPA one, without compiling
        rf_compile.reset()
        compiled(*short.args, **short.kwargs)
        assert compiled_graphs() == again
        assert all(s["calls"] == 0 for s in rf_compile.stats(model).values())  # (the sites stay registered)


def test_cost_floor_guards_a_symbolic_length(monkeypatch):
    """With costs that put the floor at 100 tokens, Wan tiny's 32 stay SDPA and its 256 compile sparse (the
    kept blocks priced free: at 256 tokens every plan keeps both 128-token blocks)."""
    config = RainFusionConfig(**{k: v for k, v in OPTIONS.items() if k != "compiler"}, min_video_tokens=0)
    B, H, D = 1, 2, 16  # Wan tiny's self-attention
    per_call = cost.SPARSE_BELOW * 4 * B * H * 100**2 * D / (cost.HOPPER.tflops(D) * 1e12) * 1e3
    costs = dataclasses.replace(cost.HOPPER, v1_call_ms=per_call, efficiency=1e6)  # kept blocks priced free
    monkeypatch.setattr(cost, "costs_for", lambda device, kernel: costs)
    monkeypatch.setattr(cost, "_VERDICTS", {})
    assert not config.predicts_nonlocal and cost.sparse_floor(config, B, H, D, None, "reference")[0] == 100

    short, long = _wan(SHORT), _wan(LONG)
    assert short.model.config.num_attention_heads == H and short.model.config.attention_head_dim == D
    model = short.model.eval()
    torch._dynamo.reset()
    rf_compile.reset()
    compiled = torch.compile(model, backend="rainfusion", options={**OPTIONS, "min_video_tokens": 0}, dynamic=True)
    with torch.no_grad():
        start = compiled_graphs()
        compiled(*short.args, **short.kwargs)
        sites = _video_sites(start)
        assert sites and all(site.reason.startswith("sparse would be slower below 100 tokens whatever the layout")
                             for site in sites)  # fmt: skip
        assert rf_compile.stats(model) == {}
        middle = compiled_graphs()
        compiled(*long.args, **long.kwargs)
    assert all(site.status == "sparse" for site in _video_sites(middle))
    assert all(s["sparse_calls"] == 1 for s in rf_compile.stats(model).values())


def test_symbolic_batch_guards_batch_times_length_squared(monkeypatch):
    """``dynamic=True`` makes a batch of 3 symbolic. With the work floor at 3 x 100^2 (+1), batches 3 and 4 at 32
    tokens share the SDPA graph, 256 tokens compile sparse once for both batches, and a short call goes back to the
    SDPA graph. Before the work floor, the first graph held the op, which ran every call."""
    config = RainFusionConfig(**{k: v for k, v in OPTIONS.items() if k != "compiler"}, min_video_tokens=0)
    H, D = 2, 16
    per_call = cost.SPARSE_BELOW * 4 * H * (3 * 100**2 + 0.5) * D / (cost.HOPPER.tflops(D) * 1e12) * 1e3
    costs = dataclasses.replace(cost.HOPPER, v1_call_ms=per_call, efficiency=1e6)  # kept blocks priced free
    monkeypatch.setattr(cost, "costs_for", lambda device, kernel: costs)
    monkeypatch.setattr(cost, "_VERDICTS", {})
    assert cost.sparse_work_floor(config, H, D, None, "reference")[0] == 30_001

    presets = {(batch, latent): build_preset("wan", "tiny", batch=batch, latent=latent)
               for batch in (3, 4) for latent in (SHORT, LONG)}  # fmt: skip
    model = presets[3, SHORT].model.eval()
    torch._dynamo.reset()
    rf_compile.reset()
    compiled = torch.compile(model, backend="rainfusion", options={**OPTIONS, "min_video_tokens": 0}, dynamic=True)
    new_graphs = []
    with torch.no_grad():
        for batch, latent in ((3, SHORT), (4, SHORT), (3, LONG), (4, LONG), (4, SHORT)):
            preset = presets[batch, latent]
            start = compiled_graphs()
            out = compiled(*preset.args, **preset.kwargs)[0]
            new_graphs.append(compiled_graphs() - start)
            if (batch, latent) == (3, SHORT):
                torch.testing.assert_close(out, model(*preset.args, **preset.kwargs)[0], atol=1e-5, rtol=1e-5)
                sites = _video_sites(start)
                assert sites and all(site.reason.endswith(
                    "; this graph is guarded to calls with batch x tokens^2 under 30,001 (at batch 3: 101 tokens; a "
                    "larger call compiles again)") for site in sites)  # fmt: skip
                assert rf_compile.stats(model) == {}
            if (batch, latent) == (3, LONG):
                assert all(site.status == "sparse" for site in _video_sites(start))
    assert new_graphs == [1, 0, 1, 0, 0]
    assert all(s["sparse_calls"] == 2 and s["calls"] == 2 for s in rf_compile.stats(model).values())


def test_a_length_range_fixed_by_mark_dynamic_is_left_to_the_op():
    """A guard narrowing a user's ``mark_dynamic(min=, max=)`` range would fail the compile: the site keeps the
    op, which decides per call (dense at 32 tokens, saying why; sparse at 256, with no new graph)."""
    short, long = _wan(SHORT), _wan(LONG)
    model = short.model.eval()
    torch._dynamo.reset()
    rf_compile.reset()
    compiled = torch.compile(model, backend="rainfusion", options=OPTIONS)
    with torch.no_grad():
        hidden = short.args[0].clone()
        torch._dynamo.mark_dynamic(hidden, 2, min=2, max=64)  # the frames: 32 to 1,024 tokens
        start = compiled_graphs()
        out = compiled(hidden, *short.args[1:], **short.kwargs)[0]
        torch.testing.assert_close(out, model(*short.args, **short.kwargs)[0], atol=1e-5, rtol=1e-5)
        assert all(site.status == "sparse" for site in _video_sites(start))
        stats = rf_compile.stats(model)
        assert stats and all(s["dense_shapes"] == {"32 video tokens < min_video_tokens=256": 1} for s in stats.values())
        rf_compile.reset()
        hidden = long.args[0].clone()
        torch._dynamo.mark_dynamic(hidden, 2, min=2, max=64)
        middle = compiled_graphs()
        compiled(hidden, *long.args[1:], **long.kwargs)
    assert compiled_graphs() == middle
    assert all(s["sparse_calls"] == 1 for s in rf_compile.stats(model).values())


@pytest.mark.gpu
@pytest.mark.parametrize("mode, dynamic", [("default", None), ("reduce-overhead", None), ("default", True)])
def test_gpu_symbolic_length_keeps_sdpa_below_the_floor_and_compiles_sparse_above(mode, dynamic):
    """Wan2.1-1.3B's 12 heads of 128, CFG batch 2, one block, with and without CUDA graphs. ``dynamic=None`` (the
    default): 1,024 tokens compile static, 3,120 symbolic and below v1's floor (~7,500 on Hopper), so SDPA under the
    guard; 32,760 fails it and compiles sparse. ``dynamic=True`` makes the batch symbolic as well: 1,024 tokens
    compile SDPA under the guard on batch x tokens^2, 3,120 run that graph, 32,760 compile sparse."""
    presets = [build_preset("wan1.3b", "full", batch=2, device="cuda", dtype=torch.bfloat16, layers=1, latent=latent)
               for latent in ((2, 32, 64), (2, 60, 104), (21, 60, 104))]  # fmt: skip
    model = presets[0].model.eval()
    torch._dynamo.reset()
    rf_compile.reset()
    options = {"dense_warmup": 0.0, "compile_mode": mode}
    compiled = torch.compile(model, backend="rainfusion", options=options, dynamic=dynamic)
    sites = []
    with torch.no_grad():
        for preset in presets:
            since = compiled_graphs()
            compiled(*preset.args, **preset.kwargs)
            sites.append(_video_sites(since))
    first, short, long = sites
    if dynamic:
        assert first and all(site.reason.startswith("sparse would be slower below batch x tokens^2") for site in first)
        assert "guarded to calls with batch x tokens^2 under" in first[0].reason and not short  # the same graph
    else:
        assert first and all(site.reason.startswith("sparse would be slower at 1,024 tokens") for site in first)
        assert short and all(site.reason.startswith("sparse would be slower below") for site in short)
        assert "guarded to calls shorter than" in short[0].reason
    assert long and all(site.status == "sparse" for site in long)
    stats = rf_compile.stats(model)
    assert stats and all(s["sparse_calls"] == 1 and s["calls"] == 1 for s in stats.values())
