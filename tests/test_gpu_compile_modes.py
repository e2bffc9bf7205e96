"""Every torch.compile mode on the GPU, CUDA graphs included (run on the device machine).

A small Wan model with head dim 64 (so the Triton kernel runs) goes through a sequence of
timesteps: warm-up, sparse steps, then a new video (warm-up again). Under each mode the dense
and sparse calls fall on the same steps as under the default mode, the outputs match it within
bf16 tolerance, and the statistics (device counters) count every call, replayed ones too. (torch.compile refuses
``mode=`` with ``options=``: the mode goes in as the ``compile_mode`` option.)
"""

import pytest
import torch

import rf_compile

pytestmark = pytest.mark.gpu

MODES = ["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"]
TIMESTEPS = [999.0, 900.0, 700.0, 500.0, 300.0, 999.0, 800.0]  # 5 steps, then a new video
# 1 dense step per video; sparse at 480 tokens, where the cost model would keep the sites dense
OPTIONS = {"min_video_tokens": 0, "num_steps": 5, "dense_warmup": 0.2, "cost_model": False}
DENSE_CALLS = [True, False, False, False, False, True, False]


def _model_and_inputs():
    from tiny_pipelines import wan_transformer_d64

    model = wan_transformer_d64().to("cuda", torch.bfloat16).eval()
    latent = torch.randn(1, 4, 5, 16, 24, device="cuda", dtype=torch.bfloat16)  # 5 x 8 x 12 = 480 tokens
    text = torch.randn(1, 9, 32, device="cuda", dtype=torch.bfloat16)
    return model, latent, text


def _run(mode: str, options: dict = OPTIONS) -> tuple[list[torch.Tensor], list[int]]:
    model, latent, text = _model_and_inputs()
    torch._dynamo.reset()
    rf_compile.reset()
    compiled = torch.compile(model, backend="rainfusion", options={**options, "compile_mode": mode})
    outputs, dense_counts = [], []
    # ATen GEMMs only: keeps max-autotune's compile short; what is under test is its CUDA graphs.
    with torch.no_grad(), torch._inductor.config.patch(max_autotune_gemm_backends="ATEN"):
        for t in TIMESTEPS:
            out = compiled(latent, timestep=torch.tensor([t], device="cuda"), encoder_hidden_states=text,
                           return_dict=False)[0]  # fmt: skip
            outputs.append(out.clone())
            stats = rf_compile.stats(model)
            dense_counts.append(stats["blocks.0.attn1"]["dense_calls"])
    return outputs, dense_counts


@pytest.fixture(scope="module")
def reference():
    return _run("default")


@pytest.mark.parametrize("mode", MODES)
def test_mode_keeps_the_per_step_decisions_and_outputs(mode, reference):
    outputs, dense_counts = _run(mode)
    expected_outputs, expected_counts = reference
    per_call = [b - a for a, b in zip([0, *dense_counts], dense_counts, strict=False)]
    assert per_call == [int(d) for d in DENSE_CALLS]
    assert dense_counts == expected_counts
    for got, want in zip(outputs, expected_outputs, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    # Sparse calls really are sparse: step 1 differs from what a dense step would compute.
    model, latent, text = _model_and_inputs()
    with torch.no_grad():
        dense = model(latent, timestep=torch.tensor([TIMESTEPS[1]], device="cuda"), encoder_hidden_states=text,
                      return_dict=False)[0]  # fmt: skip
    assert (outputs[1].float() - dense.float()).abs().max() > 1e-2


@pytest.mark.parametrize("num_steps", [5, None], ids=["num_steps option", "counted on the device"])
@pytest.mark.parametrize(
    "ramped",
    [{"mode": "v2", "sparsity": 0.5}, {"mode": "v1", "textural": "blocks", "sparsity_ramp": 0.25}],
    ids=["v2 default ramp", "v1 predicted heads"],
)
def test_sparsity_ramp_under_cuda_graphs_matches_the_default_mode(num_steps, ramped):
    """The per-step budget of predicted blocks (v2's default ``sparsity_ramp``; v1's non-local heads with
    ``textural="blocks"``) is computed on the device from host step counts (option ``num_steps``) or device
    ones; a replayed CUDA graph follows it as the default mode does."""
    options = {**OPTIONS, **ramped, "num_steps": num_steps}
    if num_steps is None:
        options["dense_warmup"] = 0.02  # 1 of the default 50 steps
    expected, expected_counts = _run("default", options)
    outputs, dense_counts = _run("reduce-overhead", options)
    assert dense_counts == expected_counts
    # With num_steps=5 the 4 key blocks kept per query block go 3, 3, 2, 2 over the sparse steps (v2; v1's
    # non-local heads, around the default share 0.42: 3, 2, 2, 1): a graph replaying the first step's budget
    # would differ from step 2 on.
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_compiled_sparse_step_never_waits_for_the_device():
    model, latent, text = _model_and_inputs()
    torch._dynamo.reset()
    rf_compile.reset()
    compiled = torch.compile(model, backend="rainfusion", options=OPTIONS)
    with torch.no_grad():
        for t in TIMESTEPS[:2]:  # compile, warm-up step, first sparse step
            compiled(latent, timestep=torch.tensor([t], device="cuda"), encoder_hidden_states=text)
        timestep = torch.tensor([TIMESTEPS[2]], device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            compiled(latent, timestep=timestep, encoder_hidden_states=text)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert rf_compile.stats(model)["blocks.0.attn1"]["sparse_calls"] == 2


def test_outer_product_mask_on_the_kernel():
    from rf_compile import RainFusionConfig, VideoLayout, sparse_attention
    from rf_compile.ops.attention import attention
    from rf_compile.ops.runtime.sites import register_site

    layout = VideoLayout(4, 16, 20, suffix=77)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    valid = torch.ones(2, layout.seq_len, dtype=torch.bool, device="cuda")
    valid[1, -30:] = False
    rows, keys = valid.view(2, 1, -1, 1), valid.view(2, 1, 1, -1)
    # 1,357 tokens: the kernel, not the cost model. Flat: the functional call below has no step clock to ramp by.
    config = RainFusionConfig(dense_warmup=0.0, cost_model=False, sparsity_ramp=0)
    out = attention(q, k, v, keys, rows, None, None, None, register_site("gpu.outer", layout, config), [])
    expected = torch.where(rows, sparse_attention(q, k, v, layout, config=config, attn_mask=keys), 0)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    assert (out[1, :, -30:] == 0).all()


def test_new_resolution_under_cuda_graphs_is_sparse():
    model, latent, text = _model_and_inputs()
    torch._dynamo.reset()
    rf_compile.reset()
    options = {**OPTIONS, "dense_warmup": 0.0, "compile_mode": "reduce-overhead"}
    compiled = torch.compile(model, backend="rainfusion", options=options)
    with torch.no_grad():
        for frames, height, width in [(5, 16, 24), (3, 20, 16), (5, 16, 24), (3, 20, 16)]:
            x = torch.randn(1, 4, frames, height, width, device="cuda", dtype=torch.bfloat16)
            compiled(x, timestep=torch.tensor([500.0], device="cuda"), encoder_hidden_states=text)
    by_layout = rf_compile.stats(model)["blocks.0.attn1"]["by_layout"]
    assert set(by_layout) == {"5x8x12", "3x10x8"}
    assert all(entry["sparse_calls"] == 2 and entry["dense_calls"] == 0 for entry in by_layout.values())
