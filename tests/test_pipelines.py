"""Real diffusers pipelines end to end (CPU): ``pipe.transformer = torch.compile(..., backend="rainfusion")``,
then ``pipe(prompt, num_inference_steps=N, height=..., width=...)`` at two resolutions and step counts.

The dense warm-up must take each video's step count from the pipeline itself (no ``num_steps``
option), every video self-attention site must run sparse after it with that video's layout, and
``mode="dense"`` must give the uncompiled pipeline's output. Expected layouts come from the tiny
components' own arithmetic (``tiny_pipelines``), not from the backend.
"""

import math

import pytest
import torch
from tiny_pipelines import PIPELINES

import rf_compile

WARMUP = 0.5  # large enough that 4 and 2 steps give different warm-ups (2 and 1), and 50 steps 25
VIDEOS = ((0, 4), (1, 2))  # (resolution, steps): a new resolution and a new step count per video


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_dense_mode_is_exact_then_sparse_after_its_own_warmup(name):
    """One test per pipeline: the dense compile at resolution 0 shares inductor's compiled kernels with
    the sparse compile's first graph (each cold compile costs tens of seconds on 2 cores)."""
    tiny = PIPELINES[name]()
    transformer = tiny.pipe.transformer
    expected = tiny(0, 2)  # uncompiled
    torch._dynamo.reset()
    tiny.pipe.transformer = torch.compile(transformer, backend="rainfusion", options={"mode": "dense"})
    torch.testing.assert_close(tiny(0, 2), expected, atol=1e-4, rtol=1e-4)

    torch._dynamo.reset()
    rf_compile.reset()
    # No num_steps: the pipeline's count. The paper's checkerboard: sparse at these tiny sizes.
    options = {"min_video_tokens": 0, "dense_warmup": WARMUP, "textural": "checkerboard"}
    if name != "wan":  # Wan's pipeline runs inductor at both resolutions; the others check the passes and the clock
        options["compiler"] = "eager"  # and skip the cold compile of the symbolic graph
    tiny.pipe.transformer = torch.compile(transformer, backend="rainfusion", options=options)
    for resolution, steps in VIDEOS:
        tiny(resolution, steps)

    stats = rf_compile.stats(transformer)
    video_sites = {site: entry for site, entry in stats.items() if entry["by_layout"]}  # (dense mode: none)
    assert len(video_sites) == tiny.sites, sorted(stats)
    pipeline = type(tiny.pipe).__name__
    for site, entry in video_sites.items():
        assert set(entry["by_layout"]) == {layout.describe() for layout in tiny.layouts}, site
        for (_, steps), layout in zip(VIDEOS, tiny.layouts):
            video = entry["by_layout"][layout.describe()]
            dense = math.ceil(WARMUP * steps) * tiny.calls_per_step  # the pipeline's count, not 50
            assert (video["calls"], video["dense_calls"]) == (steps * tiny.calls_per_step, dense), (site, layout)
            assert video["sparse_calls"] == video["calls"] - dense > 0
            assert 0.0 < video["sparsity"] < 1.0
        # The count of the last video, and where it came from.
        assert entry["num_steps_from"] == f"pipeline {pipeline} timesteps: 2 steps"
        assert (entry["num_steps"], entry["warmup_steps"]) == (2, 1)
