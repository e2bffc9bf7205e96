"""A diffusers pipeline's own step count on the GPU, CUDA graphs included (run on the device machine).

A ``WanPipeline`` (tiny VAE, prompt embeddings given, so no text encoder; a Wan transformer with
head dim 64, so the Triton kernel runs) makes two videos at two resolutions with 10 and 4 steps,
under the default mode and under ``reduce-overhead``: each video's warm-up must follow its own step
count (the threshold is a device tensor the CUDA graphs read), the per-layout calls must match, and
the outputs must match the default mode's. The count is also taken without a host sync.
"""

import math

import pytest
import torch

import rf_compile

pytestmark = pytest.mark.gpu

WARMUP = 0.5
VIDEOS = [(9, 128, 192, 10), (5, 96, 160, 4)]  # frames, height, width, steps -> 3x8x12 and 2x6x10 tokens
LAYOUTS = ["3x8x12", "2x6x10"]


def _pipeline():
    from tiny_pipelines import wan_transformer_d64

    from rf_compile.demo import tiny_wan_pipeline

    return tiny_wan_pipeline(transformer=wan_transformer_d64()).to("cuda", torch.bfloat16)


def _run(mode: str) -> tuple[list[torch.Tensor], dict]:
    pipe = _pipeline()
    model = pipe.transformer
    torch._dynamo.reset()
    rf_compile.reset()
    # cost_model off: at these tiny shapes the GPU cost model would (rightly) keep the sites dense
    options = {"min_video_tokens": 0, "dense_warmup": WARMUP, "compile_mode": mode, "cost_model": False}
    pipe.transformer = torch.compile(model, backend="rainfusion", options=options)
    if mode != "default":
        # WanPipeline calls the transformer twice a step (CFG) and reads the first output after the second
        # call: under CUDA graphs (any backend) that output is overwritten, so clone it outside the graph.
        pipe.transformer.register_forward_hook(lambda module, args, out: tuple(o.clone() for o in out))
    text = torch.randn(1, 9, 32, device="cuda", dtype=torch.bfloat16)
    videos = []
    with torch.no_grad():
        for frames, height, width, steps in VIDEOS:
            latents = pipe(
                prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text), num_inference_steps=steps,
                height=height, width=width, num_frames=frames, output_type="latent",
                generator=torch.Generator("cuda").manual_seed(0),
            ).frames  # fmt: skip
            videos.append(latents.float().clone())
    return videos, rf_compile.stats(model)


@pytest.fixture(scope="module")
def reference():
    return _run("default")


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_each_video_warms_up_on_its_pipeline_step_count(mode, reference):
    videos, stats = reference if mode == "default" else _run(mode)
    assert set(stats) == {"blocks.0.attn1", "blocks.1.attn1"}
    for entry in stats.values():
        for layout, (*_, steps) in zip(LAYOUTS, VIDEOS):
            video = entry["by_layout"][layout]
            dense = 2 * math.ceil(WARMUP * steps)  # CFG: two calls per step
            assert (video["calls"], video["dense_calls"]) == (2 * steps, dense), (mode, layout)
        assert entry["num_steps_from"] == "pipeline WanPipeline timesteps: 4 steps"
    for video, expected in zip(videos, reference[0]):
        torch.testing.assert_close(video, expected, atol=2e-2, rtol=2e-2)


def test_a_new_video_count_is_taken_without_a_host_sync():
    from rf_compile.ops.runtime.step_count import StepCount

    count = StepCount()
    threshold = count.warmup(rf_compile.RainFusionConfig(dense_warmup=WARMUP), torch.device("cuda"))

    class Pipeline:
        scheduler = None

        def __call__(self, timesteps: torch.Tensor) -> None:
            count.follow_pipeline()

    timesteps = torch.linspace(999, 0, 30, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        Pipeline()(timesteps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(threshold) == 15
