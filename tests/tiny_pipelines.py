"""Tiny diffusers video pipelines built from local components only (no hub): for tests that run the
user's whole path, ``pipe(prompt, num_inference_steps=N, height=..., width=...)``.

Each builder returns a ``TinyPipeline``: the pipeline (random weights, float32, CPU), the keyword
arguments of a call at one of two resolutions, and the layout the transformer's video
self-attention must get at that resolution, worked out here from the components' own arithmetic
(VAE compression, patch size, text length), independently of the backend's layout inference.

Text encoders are tiny ``transformers`` models from config; the tokenizer is a ``tokenizers``
WordLevel model (every word unknown but a few) wrapped in ``PreTrainedTokenizerFast``. Sizes are the
smallest that keep each model's video grid at a few tokens per axis (one block where a model has one
kind of block: compiling dominates the tests' time), so a step costs milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from rf_compile.layout import VideoLayout

PROMPT = "a red ball rolls over green grass"
TEXT_TOKENS = 8  # max_sequence_length of every call: the prompt is padded to it


@dataclasses.dataclass
class TinyPipeline:
    """A tiny pipeline and how to call it at resolution 0 or 1."""

    pipe: Any  # a diffusers DiffusionPipeline
    calls: tuple[dict[str, Any], dict[str, Any]]  # pipe(**call) keywords per resolution (no steps, seed)
    layouts: tuple[VideoLayout, VideoLayout]  # the video self-attention layout per resolution
    sites: int  # video self-attention sites in the transformer
    calls_per_step: int  # transformer calls per step (Wan runs CFG as two calls, the others as a batch of 2)

    def __call__(self, resolution: int, steps: int, seed: int = 0, **overrides: Any) -> torch.Tensor:
        """Run the pipeline at ``resolution`` for ``steps`` steps; returns the final latents."""
        kwargs = {
            "prompt": PROMPT,
            "num_inference_steps": steps,
            "generator": torch.Generator().manual_seed(seed),
            "output_type": "latent",
            "max_sequence_length": TEXT_TOKENS,
            **self.calls[resolution],
            **overrides,
        }
        with torch.no_grad():
            result = self.pipe(**kwargs)
        return result.frames if hasattr(result, "frames") else result[0]


def tokenizer(max_length: int = 77):
    """A WordLevel tokenizer over a few words (the rest map to ``<unk>``), as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "<s>", *PROMPT.split()]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=max_length,
    )


VOCAB = 16  # > the tokenizer's vocabulary


def _t5(d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = dict(
        vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return (UMT5EncoderModel(UMT5Config(**config)) if umt5 else T5EncoderModel(T5Config(**config))).eval()


def _seeded(build: Callable[[], Any]) -> Any:
    torch.manual_seed(0)
    return build()


# -- Wan 2.1 ---------------------------------------------------------------------------------------


def wan_transformer_d64() -> Any:
    """A 2-block ``WanTransformer3DModel`` with head dim 64 (the Triton kernel's smallest), for the GPU tests."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2, rope_max_seq_len=64,
    )  # fmt: skip


def wan() -> TinyPipeline:
    """WanPipeline (``make demo``'s, from the tiny ``wan`` preset): UMT5 text encoder, AutoencoderKLWan
    (4x temporal, 8x spatial), patch 1x2x2, text in a cross-attention."""
    from rf_compile.demo import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(tokenizer(), _seeded(lambda: _t5(16, umt5=True)))  # the preset's text_dim: 16
    # Pixels -> latent (F-1)/4+1 frames, /8 -> tokens /2 per side.
    calls = ({"height": 64, "width": 96, "num_frames": 5}, {"height": 96, "width": 64, "num_frames": 9})
    layouts = (VideoLayout(2, 4, 6), VideoLayout(3, 6, 4))
    return TinyPipeline(pipe, calls, layouts, sites=2, calls_per_step=2)


# -- CogVideoX 1.0 ---------------------------------------------------------------------------------


def cogvideox() -> TinyPipeline:
    """CogVideoXPipeline: T5, AutoencoderKLCogVideoX (4x temporal, 8x spatial), patch 2, text first."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = _seeded(lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=1, sample_width=12, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=TEXT_TOKENS, use_rotary_positional_embeddings=True,
    ))  # fmt: skip
    vae = _seeded(lambda: AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    ))  # fmt: skip
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer(), text_encoder=_seeded(lambda: _t5(16)), transformer=transformer.eval(), vae=vae.eval(),
        scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"),
    )  # fmt: skip
    # Pixels /8 -> latent, /2 -> tokens; (F-1)/4+1 latent frames; the text's 8 tokens come first.
    calls = ({"height": 64, "width": 96, "num_frames": 5}, {"height": 96, "width": 64, "num_frames": 9})
    layouts = (VideoLayout(2, 4, 6, prefix=TEXT_TOKENS), VideoLayout(3, 6, 4, prefix=TEXT_TOKENS))
    return TinyPipeline(_quiet(pipe), calls, layouts, sites=1, calls_per_step=1)


# -- HunyuanVideo ----------------------------------------------------------------------------------


def hunyuanvideo() -> TinyPipeline:
    """HunyuanVideoPipeline: Llama + CLIP text encoders, AutoencoderKLHunyuanVideo, patch 2, text after
    the video under a key-padding mask; guidance-distilled (one transformer call per step)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    transformer = _seeded(lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    ))  # fmt: skip
    vae = _seeded(lambda: AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False,
    ))  # fmt: skip
    llama = _seeded(lambda: LlamaModel(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
        num_hidden_layers=3, pad_token_id=0, bos_token_id=3, eos_token_id=1,
    )))  # fmt: skip
    clip = _seeded(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=77, pad_token_id=0, bos_token_id=3, eos_token_id=1, projection_dim=8,
    )))  # fmt: skip
    pipe = HunyuanVideoPipeline(
        tokenizer=tokenizer(), text_encoder=llama.eval(), tokenizer_2=tokenizer(), text_encoder_2=clip.eval(),
        transformer=transformer.eval(), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )  # fmt: skip
    template = {"prompt_template": {"template": "{}", "crop_start": 0}}  # the default's crop is for its tokenizer
    calls = (
        {"height": 64, "width": 96, "num_frames": 5, **template},
        {"height": 96, "width": 64, "num_frames": 9, **template},
    )
    # Double-stream and single-stream blocks attend over video + text (padded to TEXT_TOKENS, masked).
    layouts = (VideoLayout(2, 4, 6, suffix=TEXT_TOKENS), VideoLayout(3, 6, 4, suffix=TEXT_TOKENS))
    return TinyPipeline(_quiet(pipe), calls, layouts, sites=2, calls_per_step=1)


# -- LTX-Video -------------------------------------------------------------------------------------


def ltx() -> TinyPipeline:
    """LTXPipeline: T5, AutoencoderKLLTXVideo (here 8x temporal, 8x spatial), patch 1, latents packed
    by the pipeline before the transformer (which gets the grid as Python ints)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    transformer = _seeded(lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=1, caption_channels=16,
    ))  # fmt: skip
    vae = _seeded(lambda: AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ))  # fmt: skip
    pipe = LTXPipeline(
        tokenizer=tokenizer(), text_encoder=_seeded(lambda: _t5(16)), transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )  # fmt: skip
    # Pixels /8 -> latent = tokens (patch 1); (F-1)/8+1 latent frames; the pipeline wants multiples of 32.
    calls = ({"height": 32, "width": 64, "num_frames": 9}, {"height": 64, "width": 32, "num_frames": 17})
    layouts = (VideoLayout(2, 4, 8), VideoLayout(3, 8, 4))
    return TinyPipeline(_quiet(pipe), calls, layouts, sites=1, calls_per_step=1)


PIPELINES: dict[str, Callable[[], TinyPipeline]] = {
    "wan": wan,
    "cogvideox": cogvideox,
    "hunyuanvideo": hunyuanvideo,
    "ltx": ltx,
}


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe
