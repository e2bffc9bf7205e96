"""Presets: argument checking, eager forwards, and that the stated sites match what the model runs."""

import collections

import pytest
import torch

from rf_compile.layout import VideoLayout
from rf_compile.presets import PRESETS, Preset, build_preset

NAMES = sorted(PRESETS)


def _run_counting_sdpa(preset: Preset, monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Eager forward; count SDPA calls by (query length, key length)."""
    calls: collections.Counter = collections.Counter()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls[(query.shape[-2], key.shape[-2])] += 1
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = preset.model(*preset.args, **preset.kwargs)
    hidden_states = preset.args[0]
    if preset.name == "hunyuanvideo1.5":  # its input holds condition latents and a mask after the latents
        assert out[0].shape[1] == preset.model.config.out_channels < hidden_states.shape[1]
        assert out[0].shape[2:] == hidden_states.shape[2:]
    else:
        assert out[0].shape == hidden_states.shape
    assert torch.isfinite(out[0]).all()
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_tiny_preset_runs_the_sites_it_states(name, monkeypatch):
    preset = build_preset(name)
    assert preset.name == name and preset.size == "tiny"
    assert sum(preset.expected_layouts.values()) == preset.self_attention_sites > 0
    calls = _run_counting_sdpa(preset, monkeypatch)
    # Eager ground truth: video self-attention runs over exactly the stated layout's tokens.
    video = {(layout.seq_len, layout.seq_len): count for layout, count in preset.expected_layouts.items()}
    assert {key: calls[key] for key in video} == video
    assert sum(calls.values()) - sum(video.values()) == preset.dense_sites


@pytest.mark.parametrize("name", NAMES)
def test_tiny_preset_inputs_look_like_a_pipelines(name):
    preset = build_preset(name, batch=2)
    timestep = preset.kwargs["timestep"]
    assert isinstance(timestep, torch.Tensor) and timestep.shape == (2,)
    assert preset.args[0].shape[0] == 2
    assert not preset.model.training


def test_expected_layouts_follow_the_latent_grid():
    assert build_preset("cogvideox", latent=(4, 10, 6)).expected_layouts == {VideoLayout(4, 5, 3, prefix=7): 2}
    # CogVideoX 1.5 patches two latent frames into one token frame.
    assert build_preset("cogvideox1.5", latent=(4, 6, 10)).expected_layouts == {VideoLayout(2, 3, 5, prefix=7): 2}
    assert build_preset("wan", latent=(5, 6, 14), layers=3).expected_layouts == {VideoLayout(5, 3, 7): 3}
    hunyuan = build_preset("hunyuanvideo", layers=2)
    assert hunyuan.self_attention_sites == 4 and hunyuan.dense_sites == 1


def test_hunyuanvideo_prompt_has_padding():
    mask = build_preset("hunyuanvideo").kwargs["encoder_attention_mask"]
    assert mask.dtype == torch.bool and 0 < int((~mask).sum()) < mask.numel()


def test_mochi_notes_the_dynamo_setting():
    assert "capture_dynamic_output_shape_ops" in build_preset("mochi").notes


# Published sizes: CogVideoX-5B 5.6B, HunyuanVideo 12.8B, Wan2.1-14B 14.3B, Wan2.1-1.3B 1.42B (named for 1.3B),
# LTX-Video 1.9B, Mochi 1 10.0B, HunyuanVideo 1.5 8.3B.
FULL = {
    "cogvideox": (5.5e9, 5.7e9, VideoLayout(13, 30, 45, prefix=226), 42, 0),
    "cogvideox1.5": (5.5e9, 5.7e9, VideoLayout(11, 48, 85, prefix=226), 42, 0),
    "hunyuanvideo": (12.7e9, 12.9e9, VideoLayout(32, 30, 40, suffix=256), 60, 2),
    "hunyuanvideo1.5": (8.2e9, 8.4e9, VideoLayout(31, 45, 80, suffix=1000 + 256 + 729), 54, 2),
    "wan": (14.2e9, 14.4e9, VideoLayout(21, 30, 52), 40, 40),
    "wan1.3b": (1.40e9, 1.44e9, VideoLayout(21, 30, 52), 30, 30),
    "ltx": (1.8e9, 2.0e9, VideoLayout(21, 16, 22), 28, 28),
    "mochi": (9.9e9, 10.1e9, VideoLayout(28, 30, 53, suffix=256), 48, 1),
}


@pytest.mark.parametrize("name", NAMES)
def test_full_preset_builds_on_meta_with_the_published_config(name):
    low, high, layout, sites, dense = FULL[name]
    preset = build_preset(name, "full", device="meta", dtype=torch.bfloat16)
    params = list(preset.model.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    assert low < sum(p.numel() for p in params) < high
    assert preset.expected_layouts == {layout: sites}
    assert (preset.self_attention_sites, preset.dense_sites) == (sites, dense)
    assert preset.args[0].device.type == "meta"


def test_layers_override_changes_the_model():
    preset = build_preset("wan", layers=3)
    assert len(preset.model.blocks) == 3 and preset.self_attention_sites == 3


def test_same_seed_same_model():
    a, b = build_preset("wan", seed=1), build_preset("wan", seed=1)
    c = build_preset("wan", seed=2)
    assert torch.equal(a.args[0], b.args[0]) and not torch.equal(a.args[0], c.args[0])
    assert torch.equal(next(a.model.parameters()), next(b.model.parameters()))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="cogvideox.*wan"):
        build_preset("sora")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("wan", dict(size="huge")),
        ("wan", dict(batch=0)),
        ("wan", dict(layers=0)),
        ("cogvideox1.5", dict(latent=(3, 8, 8))),
    ],
)
def test_bad_arguments_raise(name, kwargs):
    with pytest.raises(ValueError):
        build_preset(name, **kwargs)
