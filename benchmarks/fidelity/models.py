"""The two fidelity models (diffusers classes, built from config), their inputs, sampling and loading.

``wan``: ``WanTransformer3DModel``, video self-attention + text cross-attention, RoPE inside.
``cogvideox``: ``CogVideoXTransformer3DModel``, joint text+video attention (text prefix), 3-D
rotary embeddings passed in (as the CogVideoX pipeline does).

Both: 4 layers, 4 heads x 64, pixel "latent" [3, 16, 32, 48], patch 1x2x2 -> 16 x 16 x 24 =
6,144 video tokens. Rectified flow: ``x_t = (1 - t) x_0 + t noise``, the model predicts
``noise - x_0`` at ``timestep = 1000 t``; sampling is Euler from t = 1 to 0.

Nothing here is the model's own code: the transformers are diffusers', untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from data import TEXT_LEN, embed_text, text_table
from torch.overrides import TorchFunctionMode

from rf_compile import VideoLayout

TEXT_DIM = 64
LATENT = (3, 16, 32, 48)  # C, F, H, W of the full-size models
CONFIGS = {
    "wan": dict(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=3, out_channels=3,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=1024, num_layers=4, rope_max_seq_len=1024,
    ),
    "cogvideox": dict(
        num_attention_heads=4, attention_head_dim=64, in_channels=3, out_channels=3, time_embed_dim=128,
        text_embed_dim=TEXT_DIM, num_layers=4, sample_width=48, sample_height=32, sample_frames=16, patch_size=2,
        temporal_compression_ratio=1, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True,
    ),
}  # fmt: skip
NAMES = tuple(CONFIGS)


def model_class(name: str):
    import diffusers

    return {"wan": diffusers.WanTransformer3DModel, "cogvideox": diffusers.CogVideoXTransformer3DModel}[name]


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model (diffusers' own initialisation, seeded)."""
    torch.manual_seed(seed)
    return model_class(name)(**CONFIGS[name])


def load(folder: Path, name: str | None = None, dtype=torch.float32, device="cpu") -> tuple[torch.nn.Module, dict]:
    """(model, model_card) from a folder written by ``train.py``."""
    folder = Path(folder)
    card = json.loads((folder / "model_card.json").read_text())
    from safetensors.torch import load_file

    # from_config + load_state_dict: from_pretrained of bf16 weights without `accelerate` refuses
    # models with fp32-kept modules (Wan); the weights are upcast here instead.
    cls = model_class(name or card["name"])
    model = cls.from_config(cls.load_config(folder))
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval(), card


def layout_of(name: str, frames: int, height: int, width: int) -> VideoLayout:
    """Attention layout of a pixel video of frames x height x width (patch 1x2x2)."""
    return VideoLayout(frames, height // 2, width // 2, prefix=TEXT_LEN if name == "cogvideox" else 0)


_ROTARY: dict = {}


def rotary(frames: int, grid_h: int, grid_w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX 3-D rotary embeddings (cos, sin) [frames * grid_h * grid_w, 64], as its pipeline builds them."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    key = (frames, grid_h, grid_w, str(device), dtype)
    if key not in _ROTARY:
        cos, sin = get_3d_rotary_pos_embed(64, ((0, 0), (grid_h, grid_w)), (grid_h, grid_w), frames, device=device)
        _ROTARY[key] = (cos.to(dtype), sin.to(dtype))
    return _ROTARY[key]


def forward_kwargs(name: str, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> dict:
    """Keyword arguments of one forward: ``x`` [B, 3, F, H, W], ``t`` [B] in [0, 1], ``text`` [B, L, D]."""
    timestep = t * 1000.0
    if name == "wan":
        return dict(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    _, _, frames, height, width = x.shape
    return dict(
        hidden_states=x.transpose(1, 2),
        encoder_hidden_states=text,
        timestep=timestep,
        image_rotary_emb=rotary(frames, height // 2, width // 2, x.device, x.dtype),
        return_dict=False,
    )


def predict(model, name: str, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Velocity prediction [B, 3, F, H, W] (``model`` may be compiled)."""
    out = model(**forward_kwargs(name, x, t, text))[0]
    return out if name == "wan" else out.transpose(1, 2)


def timesteps(steps: int) -> list[float]:
    """t of each Euler step, from 1 down (the last step goes to 0)."""
    return [1.0 - i / steps for i in range(steps)]


@torch.no_grad()
def sample(model, name: str, noise: torch.Tensor, text: torch.Tensor, steps: int, on_step=None) -> torch.Tensor:
    """Euler rectified-flow sampling from ``noise`` (t = 1) to t = 0; returns x_0 [B, 3, F, H, W]."""
    x = noise
    grid = timesteps(steps) + [0.0]
    for i in range(steps):
        t = torch.full((x.shape[0],), grid[i], device=x.device, dtype=x.dtype)
        if on_step is not None:
            on_step(i, grid[i])
        v = predict(model, name, x, t, text)
        x = x + (grid[i + 1] - grid[i]) * v
    return x


def conditions(tokens: torch.Tensor, card_or_dim, dtype=torch.float32) -> torch.Tensor:
    """encoder_hidden_states [B, L, D] for condition tokens, with the model's fixed table."""
    seed = card_or_dim.get("text_table_seed", 1234) if isinstance(card_or_dim, dict) else 1234
    return embed_text(tokens, text_table(TEXT_DIM, seed)).to(dtype)


class CaptureAttention(TorchFunctionMode):
    """Intercepts ``F.scaled_dot_product_attention`` in eager code; self-attention calls go to ``hook``.

    ``hook(index, q, k, v, **sdpa_kwargs)`` gets the self-attention calls (query length == key length)
    numbered in call order within the mode, and may return a replacement output (or None to
    compute SDPA as usual). Cross-attention calls pass through. The model's code is untouched.
    """

    def __init__(self, hook):
        super().__init__()
        self.hook = hook
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            bound = {**dict(zip(names, args)), **kwargs}
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            if q.shape[-2] == k.shape[-2]:
                index = self.calls
                self.calls += 1
                out = self.hook(index, q, k, v, **bound)
                if out is not None:
                    return out
        return func(*args, **kwargs)


def capture_qkv(model, name: str, x, t, text) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) [B, H, N, D] of every self-attention call of one eager forward, in layer order."""
    found = []
    with torch.no_grad(), CaptureAttention(lambda i, q, k, v, **kw: found.append((q, k, v))):
        predict(model, name, x, t, text)
    return found
