"""GPU checks at real sizes (run on the device machine; skipped without CUDA).

The kernels' own GPU tests live in test_kernels.py; these cover the op around them: the Triton
ARM against the PyTorch ARM, v2 plans on the GPU against the CPU, and that a whole sparse call
never makes the host wait for the device.
"""

import pytest
import torch

from rf_compile import Pattern, RainFusionConfig, VideoLayout, sparse_attention
from rf_compile.ops import arm, v2
from rf_compile.reference.synthetic import planted_qk

pytestmark = pytest.mark.gpu

REAL = {
    "cogvideox": (VideoLayout(13, 30, 45, prefix=226), 48, 64),
    "hunyuanvideo": (VideoLayout(32, 30, 40, suffix=256), 24, 128),
    "wan": (VideoLayout(21, 30, 52), 40, 128),
}


def qkv(layout, heads, dim, batch=1):
    return [torch.randn(batch, heads, layout.seq_len, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


@pytest.mark.parametrize("model", list(REAL))
def test_triton_arm_matches_torch_arm(model, monkeypatch):
    layout, heads, dim = REAL[model]
    q, k, _ = qkv(layout, heads, dim, batch=2)
    bandwidths = (0.125, 0.25, 0.5)
    fast = arm.arm_recalls(q, k, layout, bandwidths)
    monkeypatch.setattr(arm, "_use_triton", lambda tensor: False)
    slow = arm.arm_recalls(q, k, layout, bandwidths)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_triton_arm_recognises_planted_heads_at_real_size():
    layout = REAL["hunyuanvideo"][0]
    planted = [Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.TEXTURAL] * 2
    q, k = planted_qk(layout, planted, head_dim=128, seed=1, dtype=torch.bfloat16)
    config = RainFusionConfig(textural="checkerboard")  # the paper's ARM threshold, 0.8
    variants = arm.classify_variants(q.cuda(), k.cuda(), layout, config)
    assert variants.cpu().tolist() == [list(map(int, planted))]


@pytest.mark.parametrize("mode", ["v1", "v1+", "v2"])
def test_sparse_call_never_waits_for_the_device(mode):
    layout, heads, dim = REAL["cogvideox"]
    q, k, v = qkv(layout, heads, dim, batch=2)
    config = RainFusionConfig(mode=mode)
    sparse_attention(q, k, v, layout, config=config)  # warm-up: compiles kernels, builds cached tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sparse_attention(q, k, v, layout, config=config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_v2_plan_on_gpu_equals_cpu():
    layout = VideoLayout(6, 30, 40, prefix=32)
    q, k = (torch.randn(2, 4, layout.seq_len, 64) for _ in range(2))
    config = RainFusionConfig(mode="v2")
    cpu = v2.predict_plan(q, k, layout, config)
    gpu = v2.predict_plan(q.cuda(), k.cuda(), layout, config)
    # Block means may differ in the last bits: compare the chosen block sets, allowing rare ties.
    agree = (cpu.to_dense() == gpu.to_dense().cpu()).float().mean().item()
    assert agree > 0.999


@pytest.mark.parametrize("mode", ["v1", "v1+", "v2"])
def test_op_call_with_stats_never_waits_for_the_device(mode):
    from rf_compile.ops.attention import attention
    from rf_compile.ops.runtime.sites import register_site
    from rf_compile.ops.runtime.stats import stats

    layout, heads, dim = REAL["wan"]
    q, k, v = qkv(layout, heads, dim, batch=2)
    key = register_site(f"gpu.nosync.{mode}", layout, RainFusionConfig(mode=mode, num_steps=10, cost_model=False))
    timestep = torch.tensor([999.0], device="cuda")
    attention(q, k, v, None, None, timestep, None, None, key, [])  # step 0: dense warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # step 1: the clock, the warm-up decision, the ARM and the statistics, all without a sync
        attention(q, k, v, None, None, timestep - 100, None, None, key, [])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (stats()[key]["dense_calls"], stats()[key]["sparse_calls"]) == (1, 1)


@pytest.mark.parametrize(
    "options",
    [dict(mode="v2", order="tokens"), dict(mode="v1"), dict(mode="v1", order="tiles", textural_density=0.3),
     dict(mode="v1+", textural="blocks")],  # fmt: skip
    ids=["v2-tokens", "v1-default", "v1-tiles-0.3", "v1plus-blocks"],
)
def test_new_plans_on_the_triton_kernel_equal_the_reference_path(options):
    """v2 in the model's token order (read in place) and v1's block-predicted non-local heads (plans appended
    to the static table) on the Triton kernel, against the PyTorch path with the same plans in float32."""
    layout = VideoLayout(8, 30, 40, prefix=32)
    planted = [Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.TEXTURAL, Pattern.TEXTURAL]
    q, k = planted_qk(layout, planted, head_dim=64, seed=2, dtype=torch.bfloat16)
    q, k = q.cuda(), k.cuda()
    v = torch.randn_like(q)
    config = RainFusionConfig(**options)
    fast = sparse_attention(q, k, v, layout, config=config)
    reference = RainFusionConfig(**options, kernel="reference")
    slow = sparse_attention(q.float(), k.float(), v.float(), layout, config=reference)
    error = ((fast.float() - slow).norm() / slow.norm()).item()
    assert error < 2e-2, error


def test_per_head_budgets_on_the_fused_selection_at_real_size():
    from rf_compile.ops.attention import v2_plan

    layout, heads, dim = REAL["wan"]
    q, k, _ = qkv(layout, heads, dim)
    densities = torch.linspace(0.05, 1.0, heads, device="cuda")
    table, _ = v2_plan(q, k, layout, RainFusionConfig(mode="v2", order="tokens", sink_frames=0), None,
                       densities=densities)  # fmt: skip
    M = table.kv_num_blocks.shape[-1]
    expected = torch.clamp(torch.ceil(densities.double() * M - 1e-9), 1, M)
    # Each head keeps ceil(M * density) blocks per query block, the diagonal inside it.
    assert torch.equal(table.kv_num_blocks.max(-1).values.double().cpu(), expected.cpu())
