"""Stacking with diffusers' cache hooks (0.42.1) on a compiled tiny Wan, in a short denoising loop.

Each hook runs twice over the same steps: on the uncompiled model, and on the model compiled with the
backend at full bands (``bandwidth=1``, ``alpha=1e-6``: the sparse path, exact) with a dense warm-up
step. Checked per hook: the outputs of every step equal the hook's own (the cache decides as it does
without rainfusion), every self-attention the cache computes goes through a rewritten site and runs
sparse after the warm-up, and compiling adds no lasting graph beyond what Dynamo makes for any backend
(FasterCache's and Pyramid Attention Broadcast's per-step Python state is guarded, so they recompile in
later steps for every backend; the others compile nothing after the second step).
Hooks whose block forward is ``torch.compiler.disable`` (MagCache) keep that block out of every graph:
its attention runs eager and dense, said by a test.
"""

import collections

import pytest
import torch
import torch.nn.functional as F

import rf_compile
from rf_compile.backend import compiled_graphs
from rf_compile.presets import build_preset

STEPS = 6
TIMESTEPS = torch.linspace(999.0, 0.0, STEPS + 1)[:-1].tolist()
# One dense warm-up step; full bands: the sparse op computes exactly what SDPA does.
OPTIONS = {"min_video_tokens": 0, "num_steps": STEPS, "dense_warmup": 1 / STEPS, "bandwidth": 1.0, "alpha": 1e-6}
# What the hooks meet is Dynamo's part (graph breaks, guards, recompiles) and the passes: first-block cache runs
# them into inductor, the others into the rewritten graph as it is (``compiler="eager"``), which saves a cold
# make test the C++ compiles of five more sets of graphs.
ON_INDUCTOR = "first_block_cache"


def _hooked(name: str, now: dict):
    """The tiny Wan with hook ``name`` applied; ``now["t"]`` is the current timestep for its callbacks."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        LayerSkipConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
        TextKVCacheConfig,
        apply_layer_skip,
    )  # fmt: skip

    preset = build_preset("wan", layers=2)
    timestep = lambda: now["t"]  # noqa: E731
    configs = {
        "first_block_cache": lambda: FirstBlockCacheConfig(threshold=0.05),
        "faster_cache": lambda: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 900),
            current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
        ),  # fmt: skip
        "pyramid_attention_broadcast": lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 900),
            current_timestep_callback=timestep,
        ),  # fmt: skip
        "taylorseer_cache": lambda: TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32
        ),
        "mag_cache": lambda: MagCacheConfig(
            threshold=0.5, num_inference_steps=STEPS, mag_ratios=torch.full((STEPS,), 0.99)
        ),
        "text_kv_cache": lambda: TextKVCacheConfig(),
        "sea_cache": lambda: SeaCacheConfig(threshold=0.05),
    }
    if name == "layer_skip":
        apply_layer_skip(preset.model, LayerSkipConfig(indices=[0], fqn="blocks"))
    else:
        preset.model.enable_cache(configs[name]())
    return preset


def _step_context(preset, step: int, t: float):
    """What a pipeline tells the hooks about the step (``cache_context``), as the diffusers pipelines do."""
    return preset.model.cache_context("cond", step_index=step, num_inference_steps=STEPS, timestep=t, sigma=t / 1000)


def _loop(preset, model, now: dict, count_sdpa: bool = False) -> dict[str, list]:
    """Run the steps. Per step: the output, the graphs compiled so far, the calls and dense calls the sites
    counted so far and (``count_sdpa``: an uncompiled model) the self-attention SDPA calls made."""
    record = collections.defaultdict(list)
    sdpa = F.scaled_dot_product_attention
    made = collections.Counter()

    def counting(query, key, value, *args, **kwargs):
        made["self"] += query.shape[-2] == key.shape[-2]
        return sdpa(query, key, value, *args, **kwargs)

    latent, start = preset.args[0], compiled_graphs()
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        if count_sdpa:
            patch.setattr(F, "scaled_dot_product_attention", counting)
        for i, t in enumerate(TIMESTEPS):
            now["t"], made["self"] = t, 0
            with _step_context(preset, i, t):
                out = model(latent, **{**preset.kwargs, "timestep": torch.full((1,), t)})[0]
            sites = rf_compile.stats(preset.model).values()
            record["output"].append(out)
            record["sdpa"].append(made["self"])
            record["graphs"].append(compiled_graphs() - start)
            record["calls"].append(sum(site["calls"] for site in sites))
            record["dense"].append(sum(site["dense_calls"] for site in sites))
            latent = latent - 0.1 * out
    return record


def _per_step(totals: list[int]) -> list[int]:
    return [b - a for a, b in zip([0, *totals], totals)]


def _dynamo_graphs(name: str) -> list[int]:
    """Graphs Dynamo makes per step for the hooked model with a backend that compiles nothing."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    now = {"t": TIMESTEPS[0]}
    preset = _hooked(name, now)
    torch._dynamo.reset()
    compiled = torch.compile(preset.model, backend=backend)
    per_step = []
    with torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            now["t"] = t
            with _step_context(preset, i, t):
                compiled(preset.args[0], **{**preset.kwargs, "timestep": torch.full((1,), t)})
            per_step.append(len(graphs))
    return _per_step(per_step)


def _compiled_run(name: str, count_sdpa: bool = False):
    """The hook alone (uncompiled) and the hook on the model compiled with the backend, from the same weights;
    ``count_sdpa``: also count the SDPA calls the compiled run makes outside any graph."""
    now = {"t": TIMESTEPS[0]}
    preset = _hooked(name, now)
    reference = _loop(preset, preset.model, now, count_sdpa=True)
    preset = _hooked(name, now)  # same seed: the same weights, a fresh hook state
    torch._dynamo.reset()
    rf_compile.reset()
    options = OPTIONS if name == ON_INDUCTOR else {**OPTIONS, "compiler": "eager"}
    compiled = torch.compile(preset.model, backend="rainfusion", options=options)
    return reference, _loop(preset, compiled, now, count_sdpa)


STEADY = ["first_block_cache", "taylorseer_cache", "text_kv_cache", "layer_skip"]
COMPILABLE = [*STEADY, "faster_cache", "pyramid_attention_broadcast"]


@pytest.mark.parametrize("name", COMPILABLE)
def test_cache_hook_stacks_with_the_backend(name):
    reference, run = _compiled_run(name)
    for step, (out, ref) in enumerate(zip(run["output"], reference["output"])):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    # Every self-attention the cache computes runs through a site (none is left to SDPA), sparse after the warm-up.
    calls, dense = _per_step(run["calls"]), _per_step(run["dense"])
    assert calls == reference["sdpa"] and sum(calls) > 0
    assert dense == [calls[0]] + [0] * (STEPS - 1)
    assert run["sdpa"] == [0] * STEPS
    # Graphs: Dynamo's own for this hook (a backend that compiles nothing) plus, in the first steps only, those
    # of the step clock's pre-hook, which the first call attaches to the model where a graph break leaves the
    # blocks' graphs without the timestep (Dynamo compiles it, and the frames it splits, on later calls).
    ours, base = _per_step(run["graphs"]), _dynamo_graphs(name)
    extra = [a - b for a, b in zip(ours, base)]
    assert extra[0] == 0 and min(extra) >= 0, (ours, base)
    if name in STEADY:  # no recompile after the second step
        assert not any(extra[STEPS // 2 + 1 :]) and not any(ours[2:]), (ours, base)
    else:  # the hook's per-step Python state is guarded: Dynamo recompiles in later steps for every backend (and
        # when a recompile of the clock's frames falls varies with what the worker compiled before)
        assert any(base[2:]), base


def test_mag_cache_keeps_its_blocks_out_of_every_graph():
    """MagCache's block forward is ``torch.compiler.disable``: the blocks, attention included, run eagerly."""
    reference, run = _compiled_run("mag_cache", count_sdpa=True)
    for out, ref in zip(run["output"], reference["output"]):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert run["calls"][-1] == 0  # no site: the attention never reached a graph
    assert run["sdpa"] == reference["sdpa"] and sum(run["sdpa"]) > 0


def test_sea_cache_leaves_its_leader_block_eager():
    """SeaCache's leader-block forward is ``torch.compiler.disable``: the first block's attention runs eagerly
    and dense at every step; the other blocks' attention runs through the sites, and the outputs are the hook's."""
    reference, run = _compiled_run("sea_cache")
    for out, ref in zip(run["output"], reference["output"]):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert reference["sdpa"] == [2] * STEPS  # both blocks' self-attention at every step (no step was cached)
    assert _per_step(run["calls"]) == [1] * STEPS
