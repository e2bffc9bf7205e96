"""Sparse on every path users compile by (CPU): new resolutions with default and dynamic shapes,
regional compilation, two models of one class, and the dense warm-up counted in denoising steps.

Expected layouts come from the presets' config arithmetic; outputs are compared with a separate
static compile, with eager (``mode="dense"``) or with the whole-model compile.
"""

import math

import pytest
import torch

import rf_compile
from rf_compile.backend import compiled_graphs
from rf_compile.presets import build_preset

# The paper's v1: its checkerboard is sparse at these tiny sizes, where predicted 128-token blocks keep every key.
OPTIONS = {"min_video_tokens": 0, "dense_warmup": 0.0, "textural": "checkerboard"}
# The same passes, the rewritten graph run without inductor: for the tests that repeat a path on the other
# presets, whose subject is the layouts and sites (inductor's part of that path runs on Wan). On 2 CPU cores
# their C++ compiles took most of a cold ``make test``.
PASSES_ONLY = {**OPTIONS, "compiler": "eager"}
GRIDS = [(3, 8, 12), (5, 6, 10), (2, 10, 14)]  # latent (frames, height, width): 3 resolutions


def _out(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result.sample


def _inputs(name: str, latent=None, batch: int = 1, seed: int = 1):
    preset = build_preset(name, latent=latent, batch=batch, seed=seed)
    (layout,) = preset.expected_layouts
    return preset.args, preset.kwargs, layout


def _count_inductor_graphs(model, calls, **compile_kwargs) -> int:
    """Graphs inductor compiles for these calls (dynamic=True restarts Dynamo once to specialise floats)."""
    from torch._inductor.compile_fx import compile_fx

    count = 0

    def inductor(gm, example_inputs):
        nonlocal count
        count += 1
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=inductor, **compile_kwargs)
    with torch.no_grad():
        for args, kwargs in calls:
            compiled(*args, **kwargs)
    return count


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic-dynamic", "dynamic"])
def test_one_compile_serves_three_resolutions_sparse(dynamic):
    model = build_preset("wan").model
    calls = [_inputs("wan", latent) for latent in GRIDS]
    torch._dynamo.reset()
    rf_compile.reset()
    start = compiled_graphs()
    compiled = torch.compile(model, backend="rainfusion", options=OPTIONS, dynamic=dynamic)
    with torch.no_grad():
        outputs = [_out(compiled(*args, **kwargs)) for args, kwargs, _ in calls]
    ours = compiled_graphs() - start
    stats = rf_compile.stats(model)
    for site in ("blocks.0.attn1", "blocks.1.attn1"):
        by_layout = stats[site]["by_layout"]
        assert set(by_layout) == {layout.describe() for _, _, layout in calls}
        assert all(entry["sparse_calls"] == 1 and entry["dense_calls"] == 0 for entry in by_layout.values())
        assert stats[site]["dense_shapes"] == {}
        assert all(0 < entry["sparsity"] < 1 for entry in by_layout.values())
        # The site's totals are the sum over its layouts, head by head.
        patterns = ("spatial", "temporal", "textural")
        for h, head in enumerate(stats[site]["heads"]):
            for p in patterns:
                assert head[p] == sum(entry["heads"][h][p] for entry in by_layout.values())
    # No more graphs than inductor compiles for the same calls.
    assert ours == _count_inductor_graphs(model, [(a, k) for a, k, _ in calls], dynamic=dynamic)
    # Each output equals a static compile of that resolution alone, run without inductor (the symbolic path,
    # inductor's code included, is exact).
    for (args, kwargs, _), out in zip(calls, outputs, strict=True):
        torch._dynamo.reset()
        static = torch.compile(model, backend="rainfusion", options=PASSES_ONLY, dynamic=False)
        with torch.no_grad():
            torch.testing.assert_close(out, _out(static(*args, **kwargs)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox1.5", "hunyuanvideo", "ltx", "mochi"])
def test_every_preset_stays_sparse_through_resolution_changes(name):
    """The default ``dynamic=None`` path on the other presets: the second resolution turns the graph
    symbolic; every site is sparse at every resolution with that resolution's layout, exactly (the passes
    only: inductor's part is test_one_compile_serves_three_resolutions_sparse's)."""
    # Mochi's text length comes from torch.nonzero: one graph needs the flag its preset notes name.
    flags = {"capture_dynamic_output_shape_ops": True} if name == "mochi" else {}
    model = build_preset(name).model
    grids = [(2 * f, h, w) for f, h, w in GRIDS] if name == "cogvideox1.5" else GRIDS  # it patches frame pairs
    calls = [_inputs(name, latent) for latent in grids]
    torch._dynamo.reset()
    rf_compile.reset()
    compiled = torch.compile(model, backend="rainfusion", options=PASSES_ONLY)
    with torch.no_grad(), torch._dynamo.config.patch(**flags):
        outputs = [_out(compiled(*args, **kwargs)) for args, kwargs, _ in calls]
    sites = {site: entry for site, entry in rf_compile.stats(model).items() if entry.get("calls")}
    assert sites
    for site, entry in sites.items():
        assert set(entry["by_layout"]) == {layout.describe() for _, _, layout in calls}, site
        assert all(e["sparse_calls"] == 1 and e["dense_calls"] == 0 for e in entry["by_layout"].values()), site
        assert entry["dense_shapes"] == {}, site
    # The first resolution ran a static graph already: the later ones, on the symbolic graph, are checked.
    for (args, kwargs, _), out in zip(calls[1:], outputs[1:], strict=True):
        torch._dynamo.reset()
        static = torch.compile(model, backend="rainfusion", options=PASSES_ONLY, dynamic=False)
        with torch.no_grad(), torch._dynamo.config.patch(**flags):
            torch.testing.assert_close(out, _out(static(*args, **kwargs)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["wan", "hunyuanvideo", "ltx"])
def test_regional_compilation_is_sparse_with_the_whole_model_layout(name):
    preset = build_preset(name, batch=2)
    options = OPTIONS if name == "wan" else PASSES_ONLY  # inductor's part of the regional path runs on Wan
    model, (layout,) = preset.model, preset.expected_layouts
    torch._dynamo.reset()
    rf_compile.reset()
    with torch.no_grad():
        eager = _out(model(*preset.args, **preset.kwargs))
        whole = _out(torch.compile(model, backend="rainfusion", options=options)(*preset.args, **preset.kwargs))
    torch._dynamo.reset()
    rf_compile.reset()
    model.compile_repeated_blocks(backend="rainfusion", options=options)
    with torch.no_grad():
        regional = _out(model(*preset.args, **preset.kwargs))
    torch.testing.assert_close(regional, whole, atol=1e-5, rtol=1e-5)
    assert (regional - eager).abs().max() > 1e-4  # really sparse
    sites = {k: v for k, v in rf_compile.stats(model).items() if v["calls"]}
    assert len(sites) == preset.self_attention_sites  # one per block, not one per block class
    for entry in sites.values():
        assert entry["layout"] == layout.describe() and entry["sparse_calls"] == 1
        assert entry["layout_source"].startswith("calling model")
    # mode="dense" through the same path equals eager.
    torch._dynamo.reset()
    model.compile_repeated_blocks(backend="rainfusion", options={**options, "mode": "dense"})
    with torch.no_grad():
        torch.testing.assert_close(_out(model(*preset.args, **preset.kwargs)), eager, atol=1e-5, rtol=1e-5)


def test_blocks_compiled_one_by_one_are_sparse():
    """CogVideoX declares no ``_repeated_blocks``: compiling each block by hand is its regional path (the passes:
    the rewritten graphs run without inductor)."""
    preset = build_preset("cogvideox", batch=2)
    options = PASSES_ONLY
    model, (layout,) = preset.model, preset.expected_layouts
    torch._dynamo.reset()
    rf_compile.reset()
    with torch.no_grad():
        whole = _out(torch.compile(model, backend="rainfusion", options=options)(*preset.args, **preset.kwargs))
    torch._dynamo.reset()
    rf_compile.reset()
    for block in model.transformer_blocks:
        block.compile(backend="rainfusion", options=options)
    with torch.no_grad():
        regional = _out(model(*preset.args, **preset.kwargs))
    torch.testing.assert_close(regional, whole, atol=1e-5, rtol=1e-5)
    sites = rf_compile.stats(model)
    assert sorted(sites) == [f"transformer_blocks.{i}.attn1" for i in range(len(model.transformer_blocks))]
    assert all(entry["layout"] == layout.describe() for entry in sites.values())


def test_regional_warmup_follows_the_models_timestep():
    """A block graph has no timestep input: a hook on the model ticks the step clock."""
    preset = build_preset("wan")
    model = preset.model
    torch._dynamo.reset()
    rf_compile.reset()
    model.compile_repeated_blocks(backend="rainfusion", options={"min_video_tokens": 0, "num_steps": 4})
    with torch.no_grad():
        for t in (999.0, 700.0, 400.0, 100.0, 999.0):  # 4 steps, then a new video
            model(*preset.args, **{**preset.kwargs, "timestep": torch.full((1,), t)})
    for entry in rf_compile.stats(model).values():
        assert (entry["calls"], entry["dense_calls"]) == (5, 2)  # ceil(0.1 * 4) = 1 dense step per video


def test_two_models_of_one_class_keep_their_own_state():
    first, second = build_preset("wan", seed=1).model, build_preset("wan", seed=2).model
    args, kwargs, layout = _inputs("wan")
    torch._dynamo.reset()
    rf_compile.reset()
    options = {"min_video_tokens": 0, "dense_warmup": 0.0, "arm_every": 2}
    a = torch.compile(first, backend="rainfusion", options=options)
    b = torch.compile(second, backend="rainfusion", options=options)
    with torch.no_grad():
        for _ in range(3):
            a(*args, **kwargs)
        b(*args, **kwargs)
    stats_a, stats_b = rf_compile.stats(first), rf_compile.stats(second)
    assert stats_a.keys() == stats_b.keys() == {"blocks.0.attn1", "blocks.1.attn1"}
    for site in stats_a:
        assert (stats_a[site]["calls"], stats_a[site]["arm_runs"]) == (3, 2)
        assert (stats_b[site]["calls"], stats_b[site]["arm_runs"]) == (1, 1)
    names = {entry["model"] for entry in rf_compile.stats().values() if entry["calls"]}
    assert len(names) == 2 and all(name.startswith("WanTransformer3DModel#") for name in names)
    # The second model's output is its own, not computed with the first one's cached decisions.
    with torch.no_grad():
        expected = _out(torch.compile(second, backend="rainfusion", options=options)(*args, **kwargs))
        torch._dynamo.reset()
        rf_compile.reset()
        alone = _out(torch.compile(second, backend="rainfusion", options=options)(*args, **kwargs))
    torch.testing.assert_close(expected, alone)


# -- dense warm-up in denoising steps -------------------------------------------------------------


def _scheduler_timesteps(kind: str, shift: float, steps: int = 50) -> list[float]:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


@pytest.mark.parametrize(
    ("kind", "shift"), [("euler", 1.0), ("euler", 5.0), ("euler", 7.0), ("unipc", 5.0)], ids=str
)
def test_warmup_keeps_exactly_the_requested_steps_dense(kind, shift):
    from rf_compile.ops.attention import attention
    from rf_compile.ops.runtime.sites import register_site

    layout = rf_compile.VideoLayout(2, 4, 4)
    key = register_site(f"warmup.{kind}.{shift}", layout, rf_compile.RainFusionConfig(dense_warmup=0.1))
    q, k, v = (torch.randn(1, 2, layout.seq_len, 8) for _ in range(3))
    timesteps = _scheduler_timesteps(kind, shift)
    assert len(timesteps) == 50
    rf_compile.reset()
    dense = []
    for _video in range(2):  # a second video restarts the count
        for t in timesteps:
            for _ in range(2):  # CFG as two calls per step: still one step
                attention(q, k, v, None, None, torch.tensor([t]), None, None, key, [])
            dense.append(rf_compile.stats()[key]["dense_calls"])
    per_step = [b - a for a, b in zip([0, *dense], dense, strict=False)]
    assert per_step == ([2] * 5 + [0] * 45) * 2  # ceil(0.1 * 50) = 5 steps, both calls of each
    assert math.ceil(0.1 * 50) == 5


# -- HunyuanVideo-Framepack: history tokens before the current window ------------------------------


def _framepack():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True,
    ).eval()  # fmt: skip
    text_mask = torch.ones(1, 10, dtype=torch.bool)
    text_mask[:, -3:] = False  # 7 valid prompt tokens: the model cuts the text to them (a data-dependent length)
    kwargs = dict(
        timestep=torch.tensor([999.0]), encoder_hidden_states=torch.randn(1, 10, 16), encoder_attention_mask=text_mask,
        pooled_projections=torch.randn(1, 8), image_embeds=torch.randn(1, 5, 16), indices_latents=torch.arange(3) + 19,
        guidance=torch.tensor([6000.0]), latents_clean=torch.randn(1, 4, 2, 16, 16),
        indices_latents_clean=torch.tensor([0, 18]), latents_history_2x=torch.randn(1, 4, 2, 16, 16),
        indices_latents_history_2x=torch.tensor([1, 2]), latents_history_4x=torch.randn(1, 4, 16, 16, 16),
        indices_latents_history_4x=torch.arange(16) + 3, return_dict=False,
    )  # fmt: skip
    # The window 3x16x16 -> 3x8x8 tokens; history before it: 4x (kernel 4x8x8 on 16x16x16) 16 tokens,
    # 2x (2x4x4 on 2x16x16) 16, clean (1x2x2 on 2x16x16) 128; text after it: 5 image + 7 prompt tokens.
    layout = rf_compile.VideoLayout(3, 8, 8, prefix=16 + 16 + 128, suffix=5 + 7)
    return model, (torch.randn(1, 4, 3, 16, 16),), kwargs, layout


@pytest.mark.parametrize("capture_scalars", [True, False], ids=["capture_scalar_outputs", "graph-break"])
def test_framepack_window_is_sparse_with_history_tokens_first(capture_scalars):
    """With ``capture_scalar_outputs`` one graph reads the text length per call; without it the graph breaks at
    ``.item()`` and the blocks' layout comes from the calling model's trace, which reads the call's value."""
    model, args, kwargs, layout = _framepack()
    options = {"min_video_tokens": 0, "dense_warmup": 0.0, "bandwidth": 1.0, "alpha": 1e-6}  # full bands: exact
    if not capture_scalars:  # the graph break is Dynamo's; inductor meets the unbacked text length above
        options["compiler"] = "eager"
    torch._dynamo.reset()
    rf_compile.reset()
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=capture_scalars):
        eager = _out(model(*args, **kwargs))
        out = _out(torch.compile(model, backend="rainfusion", options=options)(*args, **kwargs))
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    stats = rf_compile.stats(model)
    sites = ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
    assert all(stats[site]["layout"] == layout.describe() and stats[site]["sparse_calls"] == 1 for site in sites)
    if not capture_scalars:
        assert all(stats[site]["layout_source"].startswith("calling model") for site in sites)


@pytest.mark.parametrize("regional", [False, True], ids=["whole-model", "compile_repeated_blocks"])
def test_hunyuanvideo15_is_sparse_on_both_compile_paths(regional):
    """Its forward branches on ``torch.all(image_embeds == 0)`` and reorders the text by boolean-mask indexing
    (graph breaks): every block's joint attention still runs sparse over frames x height x width + text."""
    preset = build_preset("hunyuanvideo1.5", batch=2)
    model, (layout,) = preset.model, preset.expected_layouts

    def run(options: dict) -> torch.Tensor:
        torch._dynamo.reset()
        rf_compile.reset()
        if regional:
            model.compile_repeated_blocks(backend="rainfusion", options=options)
            compiled = model
        else:
            compiled = torch.compile(model, backend="rainfusion", options=options)
        with torch.no_grad():
            return _out(compiled(*preset.args, **preset.kwargs))

    with torch.no_grad():
        eager = _out(model(*preset.args, **preset.kwargs))
    sparse = run(OPTIONS)
    sites = {k: v for k, v in rf_compile.stats(model).items() if v["calls"]}
    assert sorted(sites) == [f"transformer_blocks.{i}.attn" for i in range(preset.self_attention_sites)]
    for entry in sites.values():
        assert entry["layout"] == layout.describe() and entry["sparse_calls"] == 1, entry
        assert entry["layout_source"].startswith("calling model")
    assert (sparse - eager).abs().max() > 1e-4  # really sparse
    torch.testing.assert_close(run({**OPTIONS, "mode": "dense"}), eager, atol=1e-5, rtol=1e-5)


def test_mochi_joint_attention_is_sparse_with_its_data_dependent_text_length():
    preset = build_preset("mochi", batch=2)
    torch._dynamo.reset()
    rf_compile.reset()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(preset.model, backend="rainfusion", options=OPTIONS)(*preset.args, **preset.kwargs)
    stats = {k: v for k, v in rf_compile.stats(preset.model).items() if v["sparse_calls"]}
    assert len(stats) == preset.self_attention_sites  # one joint attention per layer and batch item
    assert {v["layout"] for v in stats.values()} == {layout.describe() for layout in preset.expected_layouts}


def test_dense_layers_keeps_the_first_sites_of_the_model_dense():
    preset = build_preset("wan")  # two blocks
    torch._dynamo.reset()
    rf_compile.reset()
    compiled = torch.compile(preset.model, backend="rainfusion", options={**OPTIONS, "dense_layers": 1})
    with torch.no_grad():
        compiled(*preset.args, **preset.kwargs)
    sites = rf_compile.stats(preset.model)
    first, second = sorted(sites)
    assert (sites[first]["dense_calls"], sites[second]["dense_calls"]) == (1, 0)
    assert sites[second]["sparse_calls"] == 1


def test_dense_layers_counts_the_sites_of_its_own_options():
    """A model compiled and run before with other options (as the quality grid does, mode after mode)
    keeps those sites; ``dense_layers`` still counts from the first site of its own compile."""
    preset = build_preset("wan")
    torch._dynamo.reset()
    rf_compile.reset()
    with torch.no_grad():
        torch.compile(preset.model, backend="rainfusion", options=OPTIONS)(*preset.args, **preset.kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(preset.model, backend="rainfusion", options={**OPTIONS, "dense_layers": 1})
        compiled(*preset.args, **preset.kwargs)
    sites = {k: v for k, v in rf_compile.stats(preset.model).items() if "#" in k}  # the second compile's
    first, second = sorted(sites)
    assert (sites[first]["dense_calls"], sites[second]["dense_calls"]) == (1, 0)
