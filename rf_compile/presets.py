"""Model presets: a diffusers video transformer plus the inputs a pipeline would pass it.

Used by the tests, the demo, ``rf-inspect`` and the benchmarks. Each preset builds a model from
its config (no downloads) in two sizes: ``"tiny"`` (random weights, a few layers, a small odd
video grid, one CPU forward well under a second) and ``"full"`` (the published config at its
usual resolution; pass ``device="meta"`` to build it without memory). Each preset also states
what the graph passes should find, computed from the config arithmetic alone (latent size over
patch size, text length), never from a graph: that is what the tests hold inference against.

Not for: loading weights, running pipelines, or telling the backend anything (the backend
never imports this module).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rf_compile.layout import VideoLayout

SIZES = ("tiny", "full")


@dataclasses.dataclass
class Preset:
    """A model, its forward inputs and what the graph passes should find in it.

    Attributes
    ----------
    name, size:
        Preset name (a key of ``PRESETS``) and ``"tiny"`` or ``"full"``.
    model:
        The diffusers transformer, in eval mode.
    args, kwargs:
        Forward inputs as the pipeline passes them: ``model(*args, **kwargs)``.
    expected_layouts:
        ``{VideoLayout: number of sites}`` for the video self-attention sites, from the config.
    self_attention_sites:
        Number of video self-attention SDPA sites (the sum of ``expected_layouts``).
    dense_sites:
        Number of SDPA sites that must stay dense (cross-attention, text-only refiner).
    notes:
        What a user of this preset must know (Dynamo settings, graph breaks).
    """

    name: str
    size: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    expected_layouts: dict[VideoLayout, int]
    self_attention_sites: int
    dense_sites: int
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class _Build:
    """What a builder gets: size, batch, placement, layer override and latent grid override."""

    size: str
    batch: int
    device: torch.device
    dtype: torch.dtype
    layers: int | None
    latent: tuple[int, int, int] | None

    @property
    def tiny(self) -> bool:
        return self.size == "tiny"

    def pick(self, tiny: Any, full: Any) -> Any:
        return tiny if self.tiny else full

    def grid(self, tiny: tuple[int, int, int], full: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent (frames, height, width): the override, else the size's default."""
        return self.latent or self.pick(tiny, full)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def timestep(self, value: float, dtype: torch.dtype) -> torch.Tensor:
        """Shape (batch,) timestep as ``t.expand(batch)`` in the pipelines."""
        return torch.full((self.batch,), value, device=self.device, dtype=dtype)

    def text_mask(self, length: int, padding: int) -> torch.Tensor:
        """Bool (batch, length) text mask; the last ``padding`` tokens of item 0 are padding."""
        mask = torch.ones(self.batch, length, device=self.device, dtype=torch.bool)
        if padding:
            mask[0, length - padding :] = False
        return mask


def _layout(frames: int, height: int, width: int, prefix: int = 0, suffix: int = 0) -> VideoLayout:
    return VideoLayout(frames, height, width, prefix, suffix)


# -- CogVideoX ---------------------------------------------------------------------------------


def _cogvideox(b: _Build, version: str) -> tuple[type, dict, tuple, dict, VideoLayout, int, int, str]:
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = 2
    p_t = 2 if version == "1.5" else None
    if version == "1.5":
        # CogVideoX1.5-5B at 1360x768, 81 frames: 21 latent frames, padded by the pipeline to 22.
        frames, height, width = b.grid((6, 8, 12), (22, 96, 170))
        sample = b.pick((8 * height, 8 * width, 4 * frames - 3), (300, 300, 81))
        if frames % p_t:
            raise ValueError(f"cogvideox1.5 needs an even number of latent frames (the pipeline pads), got {frames}")
    else:
        # CogVideoX-5B at 720x480, 49 frames.
        frames, height, width = b.grid((3, 8, 12), (13, 60, 90))
        sample = (height, width, 4 * (frames - 1) + 1)
    text = b.pick(7, 226)
    layers = b.layers or b.pick(2, 42)
    config = dict(
        num_attention_heads=b.pick(2, 48),
        attention_head_dim=b.pick(16, 64),
        in_channels=b.pick(4, 16),
        out_channels=b.pick(4, 16),
        time_embed_dim=b.pick(16, 512),
        text_embed_dim=b.pick(16, 4096),
        num_layers=layers,
        sample_height=sample[0],
        sample_width=sample[1],
        sample_frames=sample[2],
        patch_size=p,
        patch_size_t=p_t,
        max_text_seq_length=text,
        use_rotary_positional_embeddings=True,
        patch_bias=version != "1.5",
    )
    # Rotary embeddings are computed by the pipeline (_prepare_rotary_positional_embeddings).
    grid_h, grid_w = height // p, width // p
    base_h, base_w = sample[0] // p, sample[1] // p
    token_frames = frames if p_t is None else -(-frames // p_t)
    if p_t is None:
        # The crop region equals the grid because sample size == latent size (crops_coords of the pipeline).
        rotary = get_3d_rotary_pos_embed(
            config["attention_head_dim"], ((0, 0), (grid_h, grid_w)), (grid_h, grid_w), frames, device=b.device
        )
    else:
        rotary = get_3d_rotary_pos_embed(
            config["attention_head_dim"],
            None,
            (grid_h, grid_w),
            token_frames,
            grid_type="slice",
            max_size=(base_h, base_w),
            device=b.device,
        )
    rotary = tuple(r.to(b.dtype) for r in rotary)
    args = (
        b.randn(b.batch, frames, config["in_channels"], height, width),
        b.randn(b.batch, text, config["text_embed_dim"]),
    )
    kwargs = dict(timestep=b.timestep(999, torch.long), image_rotary_emb=rotary, return_dict=False)
    layout = _layout(token_frames, grid_h, grid_w, prefix=text)
    return CogVideoXTransformer3DModel, config, args, kwargs, layout, layers, 0, ""


# -- HunyuanVideo ------------------------------------------------------------------------------


def _hunyuanvideo(b: _Build) -> tuple[type, dict, tuple, dict, VideoLayout, int, int, str]:
    from diffusers import HunyuanVideoTransformer3DModel

    frames, height, width = b.grid((3, 8, 12), (32, 60, 80))
    text = b.pick(10, 256)
    double = b.layers or b.pick(1, 20)
    single = b.layers or b.pick(1, 40)
    refiner = b.pick(1, 2)
    config = dict(
        in_channels=b.pick(4, 16),
        out_channels=b.pick(4, 16),
        num_attention_heads=b.pick(2, 24),
        attention_head_dim=b.pick(16, 128),
        num_layers=double,
        num_single_layers=single,
        num_refiner_layers=refiner,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=b.pick(16, 4096),
        pooled_projection_dim=b.pick(8, 768),
        rope_axes_dim=b.pick((4, 6, 6), (16, 56, 56)),
        guidance_embeds=True,
    )
    args = (b.randn(b.batch, config["in_channels"], frames, height, width),)
    kwargs = dict(
        timestep=b.timestep(999.0, b.dtype),
        encoder_hidden_states=b.randn(b.batch, text, config["text_embed_dim"]),
        # Padding at the end of the prompt exercises the key-padding mask path.
        encoder_attention_mask=b.text_mask(text, padding=b.pick(3, 40)),
        pooled_projections=b.randn(b.batch, config["pooled_projection_dim"]),
        guidance=b.timestep(6000.0, b.dtype),
        return_dict=False,
    )
    layout = _layout(frames, height // 2, width // 2, suffix=text)
    # The token refiner runs self-attention over the text alone: one dense site per refiner layer.
    return HunyuanVideoTransformer3DModel, config, args, kwargs, layout, double + single, refiner, ""


# -- HunyuanVideo 1.5 --------------------------------------------------------------------------


def _hunyuanvideo15(b: _Build) -> tuple[type, dict, tuple, dict, VideoLayout, int, int, str]:
    from diffusers import HunyuanVideo15Transformer3DModel

    # HunyuanVideo-1.5 720p T2V at 1280x720, 121 frames (VAE: 4x temporal, 16x spatial, patch size 1).
    frames, height, width = b.grid((3, 8, 12), (31, 45, 80))
    # Text as HunyuanVideo15Pipeline passes it: Qwen prompt (1000 tokens), ByT5 glyph text (256) and
    # the SigLIP image tokens (729, all zero for text-to-video).
    text, glyph, image = b.pick((10, 6, 5), (1000, 256, 729))
    layers = b.layers or b.pick(2, 54)
    refiner = b.pick(1, 2)
    latent_channels = b.pick(4, 32)
    config = dict(
        in_channels=2 * latent_channels + 1,  # latents, condition latents, condition mask
        out_channels=latent_channels,
        num_attention_heads=b.pick(2, 16),
        attention_head_dim=b.pick(16, 128),
        num_layers=layers,
        num_refiner_layers=refiner,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=b.pick(16, 3584),
        text_embed_2_dim=b.pick(8, 1472),
        image_embed_dim=b.pick(12, 1152),
        rope_axes_dim=b.pick((4, 6, 6), (16, 56, 56)),
        target_size=b.pick(640, 960),
        task_type="t2v",
    )
    args = (b.randn(b.batch, config["in_channels"], frames, height, width),)
    kwargs = dict(
        timestep=b.timestep(999.0, b.dtype),
        # The tokenizers' int64 masks, padded at the end of the prompt (the model reorders valid tokens first).
        encoder_hidden_states=b.randn(b.batch, text, config["text_embed_dim"]),
        encoder_attention_mask=b.text_mask(text, padding=b.pick(3, 800)).long(),
        encoder_hidden_states_2=b.randn(b.batch, glyph, config["text_embed_2_dim"]),
        encoder_attention_mask_2=b.text_mask(glyph, padding=b.pick(2, 250)).long(),
        image_embeds=torch.zeros(b.batch, image, config["image_embed_dim"], device=b.device, dtype=b.dtype),
        return_dict=False,
    )
    layout = _layout(frames, height, width, suffix=text + glyph + image)
    notes = (
        "The forward branches on torch.all(image_embeds == 0) and reorders the text with boolean-mask "
        "indexing: Dynamo breaks the graph there, so the blocks' graph holds no video grid. Their layout "
        "comes from one trace of the model on fake tensors, whose data-dependent steps take the call's "
        "real values. SDPA gets a [B, 1, N, N] mask, the outer product of the text padding."
    )
    # The token refiner runs self-attention over the prompt alone: one dense site per refiner layer.
    return HunyuanVideo15Transformer3DModel, config, args, kwargs, layout, layers, refiner, notes


# -- Wan ---------------------------------------------------------------------------------------


# Wan2.1-T2V sizes: (attention heads, ffn dim, blocks); both run 832x480 at 81 frames.
_WAN_SIZES = {"14B": (40, 13824, 40), "1.3B": (12, 8960, 30)}


def _wan(b: _Build, version: str) -> tuple[type, dict, tuple, dict, VideoLayout, int, int, str]:
    from diffusers import WanTransformer3DModel

    # Wan2.1-T2V-14B / -1.3B at 832x480, 81 frames.
    heads, ffn, blocks = _WAN_SIZES[version]
    frames, height, width = b.grid((3, 8, 12), (21, 60, 104))
    text = b.pick(9, 512)
    layers = b.layers or b.pick(2, blocks)
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=b.pick(2, heads),
        attention_head_dim=b.pick(16, 128),
        in_channels=b.pick(4, 16),
        out_channels=b.pick(4, 16),
        text_dim=b.pick(16, 4096),
        freq_dim=b.pick(16, 256),
        ffn_dim=b.pick(32, ffn),
        num_layers=layers,
        rope_max_seq_len=b.pick(64, 1024),
    )
    args = (b.randn(b.batch, config["in_channels"], frames, height, width),)
    kwargs = dict(
        timestep=b.timestep(999.0, torch.float32),
        encoder_hidden_states=b.randn(b.batch, text, config["text_dim"]),
        return_dict=False,
    )
    layout = _layout(frames, height // 2, width // 2)
    # Each block has a cross-attention to the text (query length != key length): dense.
    return WanTransformer3DModel, config, args, kwargs, layout, layers, layers, ""


# -- LTX-Video ---------------------------------------------------------------------------------


def _ltx(b: _Build) -> tuple[type, dict, tuple, dict, VideoLayout, int, int, str]:
    from diffusers import LTXVideoTransformer3DModel

    # LTX-Video 0.9 at 704x512, 161 frames (VAE: 8x temporal, 32x spatial, patch size 1).
    frames, height, width = b.grid((3, 4, 6), (21, 16, 22))
    text = b.pick(8, 128)
    layers = b.layers or b.pick(2, 28)
    heads, head_dim = b.pick(2, 32), b.pick(16, 64)
    config = dict(
        in_channels=b.pick(8, 128),
        out_channels=b.pick(8, 128),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        num_layers=layers,
        caption_channels=b.pick(16, 4096),
    )
    args = (b.randn(b.batch, frames * height * width, config["in_channels"]),)
    kwargs = dict(
        encoder_hidden_states=b.randn(b.batch, text, config["caption_channels"]),
        timestep=b.timestep(999.0, torch.float32),
        encoder_attention_mask=b.text_mask(text, padding=b.pick(2, 20)).to(b.dtype),
        num_frames=frames,
        height=height,
        width=width,
        rope_interpolation_scale=(8 / 25, 32, 32),  # (vae temporal / frame_rate, vae spatial, vae spatial)
        return_dict=False,
    )
    layout = _layout(frames, height, width)
    notes = (
        "hidden_states is already patchified (B, N, C); the grid reaches the graph only through num_frames/"
        "height/width, which Dynamo bakes in as constants of the rotary-coordinate computation."
    )
    return LTXVideoTransformer3DModel, config, args, kwargs, layout, layers, layers, notes


# -- Mochi -------------------------------------------------------------------------------------


def _mochi(b: _Build) -> tuple[type, dict, tuple, dict, VideoLayout, int, int, str]:
    from diffusers import MochiTransformer3DModel

    # Mochi 1 at 848x480, 163 frames (VAE: 6x temporal, 8x spatial).
    frames, height, width = b.grid((3, 8, 12), (28, 60, 106))
    text = b.pick(8, 256)
    layers = b.layers or b.pick(2, 48)
    config = dict(
        num_attention_heads=b.pick(2, 24),
        attention_head_dim=b.pick(16, 128),
        num_layers=layers,
        pooled_projection_dim=b.pick(16, 1536),
        in_channels=b.pick(4, 12),
        text_embed_dim=b.pick(16, 4096),
        time_embed_dim=b.pick(16, 256),
        max_sequence_length=text,
    )
    args = (b.randn(b.batch, config["in_channels"], frames, height, width),)
    kwargs = dict(
        encoder_hidden_states=b.randn(b.batch, text, config["text_embed_dim"]),
        timestep=b.timestep(999.0, b.dtype),
        encoder_attention_mask=b.text_mask(text, padding=0),
        return_dict=False,
    )
    layout = _layout(frames, height // 2, width // 2, suffix=text)
    notes = (
        "The joint attention runs once per batch item over video + the valid text tokens, chosen with "
        "torch.nonzero on the text mask: Dynamo breaks the graph there (8 breaks) unless "
        "torch._dynamo.config.capture_dynamic_output_shape_ops = True; with it the text length is unbacked "
        "(N = u0 + video) and rf_compile reads it per call: the joint attention runs sparse. "
        "The expected layout assumes an unpadded prompt (all text tokens valid)."
    )
    # One joint SDPA per batch item and layer; the time embedding's attention pooling (one query) is dense.
    return MochiTransformer3DModel, config, args, kwargs, layout, layers * b.batch, 1, notes


PRESETS: dict[str, Callable[[_Build], tuple]] = {
    "cogvideox": lambda b: _cogvideox(b, "1.0"),
    "cogvideox1.5": lambda b: _cogvideox(b, "1.5"),
    "hunyuanvideo": _hunyuanvideo,
    "hunyuanvideo1.5": _hunyuanvideo15,
    "wan": lambda b: _wan(b, "14B"),
    "wan1.3b": lambda b: _wan(b, "1.3B"),
    "ltx": _ltx,
    "mochi": _mochi,
}


@contextlib.contextmanager
def _default_placement(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no full-size fp32 copy on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_preset(
    name: str,
    size: str = "tiny",
    *,
    batch: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: int | None = None,
    seed: int = 0,
    latent: tuple[int, int, int] | None = None,
) -> Preset:
    """Build preset ``name`` at ``size``: the model, its inputs and the expected attention sites.

    Parameters
    ----------
    name:
        A key of ``PRESETS``.
    size:
        ``"tiny"`` (random weights, CPU-fast) or ``"full"`` (published config and resolution).
    batch:
        Batch size of the inputs.
    device, dtype:
        Where the model and inputs live; ``"meta"`` builds without memory.
    layers:
        Number of transformer layers instead of the size's default (HunyuanVideo: of both the
        dual- and the single-stream stacks).
    seed:
        Seed of the random weights and inputs (through ``torch.manual_seed``, so it reseeds the global RNG).
    latent:
        Latent video (frames, height, width) instead of the size's default, before patching
        (LTX: the token grid, its patch size is 1).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    if size not in SIZES:
        raise ValueError(f"preset size must be one of {list(SIZES)}, got {size!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ValueError(f"layers must be a positive int or None, got {layers!r}")
    torch.manual_seed(seed)
    build = _Build(size, batch, torch.device(device), dtype, layers, tuple(latent) if latent else None)
    with _default_placement(build.device, dtype):
        cls, config, args, kwargs, layout, sites, dense, notes = PRESETS[name](build)
        model = cls(**config)
    model.eval()
    return Preset(
        name=name,
        size=size,
        model=model,
        args=args,
        kwargs=kwargs,
        expected_layouts={layout: sites},
        self_attention_sites=sites,
        dense_sites=dense,
        notes=notes,
    )
