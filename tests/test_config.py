"""Option parsing: our keys become a validated RainFusionConfig, the rest stays for inductor."""

import pytest
import torch

from rf_compile import RainFusionConfig, VideoLayout


def test_defaults_follow_the_paper():
    config, rest = RainFusionConfig.from_options(None)
    assert (config.mode, config.bandwidth, config.stride, config.dense_warmup) == ("v1", 0.25, 2, 0.1)
    assert rest == {}


@pytest.mark.parametrize(
    ("dense_warmup", "num_steps", "dense_steps"), [(0.1, 50, 5), (0.1, 7, 1), (0.25, 30, 8), (0.0, 50, 0)]
)
def test_warmup_steps_round_up(dense_warmup, num_steps, dense_steps):
    assert RainFusionConfig(dense_warmup=dense_warmup, num_steps=num_steps).warmup_steps == dense_steps


def test_our_keys_are_taken_and_inductor_keys_left():
    config, rest = RainFusionConfig.from_options(
        {
            "mode": "v1+",
            "bandwidths": [0.5, 0.25],
            "layout": {"frames": 2, "height": 3, "width": 4},
            "max_autotune": True,
        }
    )
    assert config.mode == "v1+" and config.head_bandwidths == (0.25, 0.5)
    assert config.layout == VideoLayout(2, 3, 4)
    assert rest == {"max_autotune": True}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "sparse"}, r"'mode' must be one of \['v1', 'v1\+', 'v2', 'dense', 'calibrate'\]"),
        ({"bandwidth": 0.0}, r"'bandwidth' must be a fraction in \(0, 1\]"),
        ({"bandwidth": 1.5}, r"'bandwidth' must be a fraction"),
        ({"bandwidths": []}, "'bandwidths' must hold at least one"),
        ({"stride": 1}, "'stride' must be an int >= 2"),
        ({"stride": 2.5}, "'stride' must be an int >= 2"),
        ({"alpha": -0.1}, "'alpha' must be a fraction"),
        ({"dense_warmup": 1.0}, r"'dense_warmup' must be a fraction in \[0, 1\)"),
        ({"sample_stride": 0}, "'sample_stride' must be an int >= 1"),
        ({"arm_every": 0}, "'arm_every' must be an int >= 1"),
        ({"arm_query_rows": 0}, "'arm_query_rows' must be an int >= 1"),
        ({"arm_query_rows": 256.0}, "'arm_query_rows' must be an int >= 1"),
        ({"kernel": "cuda"}, "'kernel' must be one of"),
        ({"precision": "fp4"}, r"'precision' must be one of \['bf16', 'fp8', 'int8'\]"),
        ({"report": "yes"}, "'report' must be True or False"),
        ({"measure_error": 1}, "'measure_error' must be True or False"),
        ({"order": "raster"}, r"'order' must be one of \['tiles', 'tokens'\]"),
        ({"textural": "dense"}, r"'textural' must be one of \['checkerboard', 'blocks'\]"),
        ({"dense_layers": -1}, "'dense_layers' must be an int >= 0"),
        ({"budget": "layer"}, r"'budget' must be one of \['query_block', 'heads', 'call'\]"),
        ({"budget_floor": 0.0}, r"'budget_floor' must be a fraction in \(0, 1\]"),
        ({"budget": "heads", "select": "mass"}, "use it with select='topk'"),
        ({"mode": "v2", "budget": "call", "profile": "p.json"}, "use it with budget='query_block'"),
        ({"dense_last_steps": 1.5}, "'dense_last_steps' must be an int >= 0"),
        ({"mode": "v2", "sparsity_ramp": -0.1}, "'sparsity_ramp' must be a fraction >= 0 or None"),
        ({"mode": "v2", "sparsity": 0.8, "sparsity_ramp": 0.2}, r"to \[0.6, 1\]; accepted: both ends in \[0, 1\)"),
        ({"textural": "checkerboard", "sparsity_ramp": 0.1}, r"use it with mode='v2', or mode='v1' / 'v1\+' with "
         r"textural='blocks', and budget='query_block' and no profile \(got mode='v1', textural='checkerboard'"),
        ({"mode": "v1+", "sparsity_ramp": 0.1}, r"got mode='v1\+', textural='checkerboard'"),  # v1+'s default
        ({"mode": "v2", "budget": "call", "sparsity_ramp": 0.1}, r"budget='call', profile=None\)"),
        ({"textural": "blocks", "sparsity_ramp": 0.6}, r"takes sparsity 0.58 to \[-0.02, 1.18\]; accepted"),
        ({"textural": "blocks", "textural_density": 0}, r"'textural_density' must be a fraction in \(0, 1\]"),
        ({"textural": "checkerboard", "textural_density": 0.4}, r"\(got mode='v1', textural='checkerboard'\)"),
        ({"mode": "v1+", "textural_density": 0.4}, r"mode='v1\+' and textural='blocks' \(got mode='v1\+', textural="),
        ({"mode": "v2", "textural": "blocks", "textural_density": 0.4}, r"got mode='v2'"),
        ({"compiler": "aot_eager"}, r"'compiler' must be one of \['inductor', 'eager'\]"),
        ({"compiler": "eager", "compile_mode": "max-autotune"}, "is an inductor mode: use it with compiler='inductor'"),
        ({"compiler": "eager", "max_autotune": True}, r"inductor option\(s\) \['max_autotune'\] need compiler="),
        ({"num_steps": 10, "dense_last_steps": 10}, r"add up to more than 'num_steps' \(10\)"),
        ({"bandwith": 0.25}, r"unknown rainfusion option\(s\) \['bandwith'\]; accepted keys"),
        ({"layout": {"frames": 0, "height": 3, "width": 4}}, "layout frames must be a positive int"),
        ({"layout": {"frames": 2, "height": 3}}, r"layout is missing \['width'\]"),
        ({"layout": {"frames": 2, "height": 3, "width": 4, "depth": 1}}, r"unknown keys \['depth'\]"),
        ({"layout": "13x30x45"}, "layout must be a VideoLayout, a dict"),
        ({"layout": (2, 3, 4, -1)}, "layout prefix must be a non-negative int"),
    ],
)
def test_bad_options_raise_value_error_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        RainFusionConfig.from_options(options)


def test_layout_accepts_tuples():
    layout = VideoLayout.from_value((13, 30, 45, 226))
    assert (layout.seq_len, layout.describe()) == (17776, "13x30x45 +226 text first")


def test_compile_mode_option_is_checked_and_reaches_inductor(monkeypatch):
    from rf_compile.config import OptionError

    with pytest.raises(OptionError, match="'compile_mode' must be one of"):
        RainFusionConfig.from_options({"compile_mode": "fast"})
    import torch._inductor.compile_fx as compile_fx_module

    from rf_compile.backend import rainfusion

    seen = {}
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches=None: seen.update(
        patches=config_patches) or gm.forward)  # fmt: skip
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    rainfusion(gm, [torch.randn(1, 2)], options={"compile_mode": "max-autotune"})
    assert seen["patches"]["max_autotune"] and seen["patches"]["triton.cudagraphs"]


@pytest.mark.parametrize(
    ("options", "ramp"),
    [
        ({"mode": "v2"}, 0.15),  # 0.65 -> 0.95 over the sparse steps
        ({"mode": "v2", "sparsity": 0.9}, 0.09),  # narrowed to end at 0.99
        ({"mode": "v2", "sparsity": 0.1}, 0.1),  # narrowed to start at 0
        ({"mode": "v2", "sparsity_ramp": 0}, 0.0),
        ({"mode": "v2", "sparsity_ramp": 0.3, "sparsity": 0.5}, 0.3),
        ({"mode": "v2", "budget": "heads"}, 0.0),  # pooled budgets are not scheduled
        ({"mode": "v1"}, 0.15),  # its predicted heads: 0.43 -> 0.73
        ({"mode": "v1", "textural_density": 0.1}, 0.09),  # narrowed to end at 0.99
        ({"mode": "v1", "textural": "checkerboard"}, 0.0),  # the checkerboard has no block budget
        ({"mode": "v1+"}, 0.0),  # v1+'s default is the checkerboard
    ],
)
def test_the_default_sparsity_ramp_applies_to_v2_and_fits_its_sparsity(options, ramp):
    config, _ = RainFusionConfig.from_options(options)
    assert config.ramp == pytest.approx(ramp)
    sparsity = config.ramped_sparsity if config.ramped_sparsity is not None else config.sparsity
    assert 0 <= sparsity - config.ramp and sparsity + config.ramp <= 0.99 + 1e-12


@pytest.mark.parametrize("stride", [2, 3])
def test_a_v1_ramp_moves_the_block_predicted_heads_around_their_share(stride):
    config, _ = RainFusionConfig.from_options({"textural": "blocks", "stride": stride, "sparsity_ramp": 0.2})
    assert (config.ramp, config.ramped_sparsity) == (0.2, pytest.approx(0.58))  # the default share, 0.42
    assert RainFusionConfig(stride=stride, textural="checkerboard").ramped_sparsity is None  # no block budget
    config = RainFusionConfig(textural="blocks", stride=stride, textural_density=0.46, sparsity_ramp=0.2)
    assert config.ramped_sparsity == pytest.approx(0.54)


@pytest.mark.parametrize(
    ("options", "pattern", "order", "threshold"),
    [
        ({"mode": "v1"}, "blocks", "tokens", 0.99),  # v1's defaults
        ({"mode": "v1", "textural": "checkerboard"}, "checkerboard", "tokens", 0.8),  # the paper's v1
        ({"mode": "v1", "alpha": 0.9}, "blocks", "tokens", 0.9),
        ({"mode": "v1+"}, "checkerboard", "tokens", 0.9),  # v1+'s threshold is recall_target
        ({"mode": "v1+", "textural": "blocks", "order": "tiles"}, "blocks", "tiles", 0.9),
        ({"mode": "v2"}, "checkerboard", "tiles", 0.8),  # no ARM: the unused threshold stays the paper's
    ],
)
def test_the_defaults_left_as_none_resolve_per_mode(options, pattern, order, threshold):
    config = RainFusionConfig(**options)
    assert (config.textural_pattern, config.block_order, config.threshold) == (pattern, order, threshold)
    assert config.predicts_nonlocal == (pattern == "blocks" and config.mode != "v2")


def test_the_predicted_heads_take_v1s_order_share_and_ramp():
    """v2 settings of v1's predicted heads: v1's token order (not v2's tiles), its share, its ramp."""
    from rf_compile.ops.v2 import nonlocal_config

    blocks = nonlocal_config(RainFusionConfig())
    assert (blocks.mode, blocks.block_order, blocks.ramp) == ("v2", "tokens", pytest.approx(0.15))
    assert blocks.sparsity == pytest.approx(0.58)
    tiles = nonlocal_config(RainFusionConfig(order="tiles", textural_density=0.3, sparsity_ramp=0))
    assert (tiles.block_order, tiles.sparsity, tiles.ramp) == ("tiles", pytest.approx(0.7), 0.0)
