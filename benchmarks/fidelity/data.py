"""Procedural training video for the fidelity models, deterministic from a seed, rendered on any device.

Each clip is a textured background that pans, with a lighting change over time, and two or three
textured sprites (disc, square, triangle, ring, cross) that move, orbit, spin or zoom and occlude
each other (painter's order). The condition is a short token sequence naming what is in the clip:
``[background, lighting, class_1, motion_1, class_2, motion_2, class_3|<pad>, motion_3|<pad>]``,
embedded with a fixed random table (no text encoder).

All random parameters are drawn on the CPU from ``torch.Generator(seed)`` (so a seed gives the
same clip on every device); the rendering is vectorised torch on ``device``. Pixel values lie in
[-1, 1]; the pixels are the "latent" of the models (3 channels, no VAE).

Not a data set loader: there are no files, every batch is rendered on demand.
"""

from __future__ import annotations

import math

import torch

BACKGROUNDS = ["stripes", "checker", "waves", "dots"]
LIGHTING = ["steady", "flicker", "fade-in", "fade-out", "sweep"]
CLASSES = ["disc", "square", "triangle", "ring", "cross"]
MOTIONS = ["left", "right", "up", "down", "orbit", "spin", "zoom"]
VOCAB = ["<pad>", *BACKGROUNDS, *LIGHTING, *CLASSES, *MOTIONS]
TEXT_LEN = 8
MAX_SPRITES = 3
TOKEN = {word: i for i, word in enumerate(VOCAB)}


def text_table(dim: int, seed: int = 1234) -> torch.Tensor:
    """Fixed embedding table, float32 [len(VOCAB) + TEXT_LEN, dim]: word rows, then slot (position) rows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(len(VOCAB) + TEXT_LEN, dim, generator=g)
    table[len(VOCAB) :] *= 0.5
    table[0] = 0.0
    return table


def embed_text(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """encoder_hidden_states [B, L, D] from tokens [B, L]: word row + slot row (pad tokens get the slot only)."""
    slots = torch.arange(tokens.shape[1], device=tokens.device) + len(VOCAB)
    table = table.to(tokens.device)
    return table[tokens] + table[slots][None]


def describe(tokens: torch.Tensor) -> list[str]:
    """Readable condition of each sample: ``"stripes flicker disc left square orbit"``."""
    return [" ".join(VOCAB[t] for t in row.tolist() if t) for row in tokens]


def _params(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    S = MAX_SPRITES
    return {
        "bg": torch.randint(len(BACKGROUNDS), (batch,), generator=g),
        "light": torch.randint(len(LIGHTING), (batch,), generator=g),
        "bg_angle": u(batch) * math.pi,
        "bg_freq": 5.0 + 7.0 * u(batch),
        "bg_pan": (u(batch, 2) - 0.5) * 0.16,  # coordinate units per frame (2 units = frame height)
        "bg_colors": (u(batch, 2, 3) - 0.5) * 1.6,
        "light_freq": 0.15 + 0.2 * u(batch),
        "light_phase": u(batch) * 2 * math.pi,
        "light_x0": (u(batch) - 0.5) * 2.0,
        "cls": torch.randint(len(CLASSES), (batch, S), generator=g),
        "motion": torch.randint(len(MOTIONS), (batch, S), generator=g),
        "active": torch.cat([torch.ones(batch, 2, dtype=torch.bool), u(batch, S - 2) < 0.5], 1),
        "center": (u(batch, S, 2) - 0.5) * torch.tensor([1.4, 1.0]),
        "radius": 0.22 + 0.2 * u(batch, S),
        "speed": 0.05 + 0.06 * u(batch, S),
        "omega": 0.15 + 0.25 * u(batch, S),
        "phase": u(batch, S) * 2 * math.pi,
        "orbit": 0.25 + 0.3 * u(batch, S),
        "angle": u(batch, S) * 2 * math.pi,
        "drift_spin": (u(batch, S) - 0.5) * 0.1,
        "color": (u(batch, S, 3) - 0.5) * 2.0,
        "tex_freq": 2.0 + 4.0 * u(batch, S),
    }


def _reflect(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Bounce ``x`` back and forth inside [-bound, bound] (a triangle wave)."""
    u = torch.remainder(x + bound, 4 * bound)
    return torch.where(u < 2 * bound, u, 4 * bound - u) - bound


def _sdf(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (in sprite radii) of each sprite class; ``cls`` broadcasts against u, v."""
    r = torch.sqrt(u * u + v * v)
    disc = r - 1.0
    square = torch.maximum(u.abs(), v.abs()) - 0.8
    triangle = torch.maximum(u.abs() * 0.866 + v * 0.5, -v) - 0.5
    ring = (r - 0.72).abs() - 0.28
    cross = torch.minimum(torch.maximum(u.abs() - 0.32, v.abs() - 1.0), torch.maximum(u.abs() - 1.0, v.abs() - 0.32))
    shapes = torch.stack([disc, square, triangle, ring, cross])
    return torch.gather(shapes, 0, cls.expand_as(disc)[None]).squeeze(0)


@torch.no_grad()
def render(params: dict[str, torch.Tensor], frames: int, height: int, width: int, device) -> torch.Tensor:
    """Video [B, 3, frames, height, width] in [-1, 1] from ``_params``."""
    p = {k: v.to(device) for k, v in params.items()}
    B = p["bg"].shape[0]
    aspect = width / height
    t = torch.arange(frames, device=device, dtype=torch.float32).view(1, frames, 1, 1)
    y = (torch.arange(height, device=device) + 0.5) / height * 2 - 1
    x = ((torch.arange(width, device=device) + 0.5) / width * 2 - 1) * aspect
    y, x = y.view(1, 1, height, 1), x.view(1, 1, 1, width)

    # -- background: a texture of one of four kinds, panning ---------------------------------
    col = lambda a: a.view(B, 1, 1, 1)  # noqa: E731
    px = x - col(p["bg_pan"][:, 0]) * t
    py = y - col(p["bg_pan"][:, 1]) * t
    ca, sa = col(torch.cos(p["bg_angle"])), col(torch.sin(p["bg_angle"]))
    a, b = ca * px + sa * py, -sa * px + ca * py
    f = col(p["bg_freq"])
    kinds = torch.stack(
        [
            torch.sin(f * a),
            torch.tanh(3 * torch.sin(f * a) * torch.sin(f * b)),
            0.6 * torch.sin(f * a + 1.5 * torch.sin(0.5 * f * b)) + 0.4 * torch.sin(0.7 * f * b),
            torch.tanh(4 * (torch.cos(f * a) * torch.cos(f * b) - 0.3)),
        ],
        1,
    )  # [B, 4, F, H, W]
    pattern = torch.gather(kinds, 1, p["bg"].view(B, 1, 1, 1, 1).expand(-1, 1, *kinds.shape[2:])).squeeze(1)
    c1, c2 = p["bg_colors"][:, 0].view(B, 3, 1, 1, 1), p["bg_colors"][:, 1].view(B, 3, 1, 1, 1)
    w = 0.5 + 0.5 * pattern[:, None]
    video = c1 * w + c2 * (1 - w)  # [B, 3, F, H, W]

    # -- sprites: positions, angles, scales per frame; painter's order -----------------------
    S = MAX_SPRITES
    m = p["motion"]
    tt = t.view(1, 1, frames)  # [1, 1, F]
    direction = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]], device=device)
    linear = direction[m.clamp(max=3)]  # [B, S, 2]
    is_linear = (m <= 3).float()[..., None, None]
    is_orbit = (m == 4).float()[..., None, None]
    shift = linear[..., None, :] * (p["speed"][..., None] * tt)[..., None]  # [B, S, F, 2]
    wt = p["omega"][..., None] * tt + p["phase"][..., None]  # [B, S, F]
    circle = torch.stack([torch.cos(wt), torch.sin(wt)], -1) * p["orbit"][..., None, None]
    circle = circle - circle[..., :1, :]
    center = p["center"][..., None, :] + is_linear * shift + is_orbit * circle
    center = torch.stack([_reflect(center[..., 0], aspect - 0.2), _reflect(center[..., 1], 0.8)], -1)
    spin = torch.where(m == 5, p["omega"], p["drift_spin"])
    angle = p["angle"][..., None] + spin[..., None] * tt  # [B, S, F]
    zoom = torch.where((m == 6)[..., None], 1.0 + 0.45 * torch.sin(wt), torch.ones_like(wt))
    radius = p["radius"][..., None] * zoom  # [B, S, F]

    e = lambda a: a[..., None, None]  # noqa: E731  [B, S, F] -> [B, S, F, 1, 1]
    dx, dy = x[:, None] - e(center[..., 0]), y[:, None] - e(center[..., 1])
    ca, sa = torch.cos(e(angle)), torch.sin(e(angle))
    u = (ca * dx + sa * dy) / e(radius)
    v = (-sa * dx + ca * dy) / e(radius)  # [B, S, F, H, W]
    d = _sdf(p["cls"].view(B, S, 1, 1, 1), u, v)
    alpha = torch.sigmoid(-d * e(radius) * height * 1.5) * p["active"].float().view(B, S, 1, 1, 1)
    stripes = 0.7 + 0.3 * torch.cos(p["tex_freq"].view(B, S, 1, 1, 1) * math.pi * u)
    shade = 1.0 - 0.25 * (u + v).clamp(-1, 1)
    for s in range(S):
        texture = p["color"][:, s].view(B, 3, 1, 1, 1) * (stripes[:, s] * shade[:, s])[:, None]
        video = video * (1 - alpha[:, s, None]) + texture * alpha[:, s, None]

    # -- lighting over time (and a moving light band for "sweep") ----------------------------
    light = p["light"].view(B, 1, 1, 1)
    tn = t / max(frames - 1, 1)
    flicker = 1.0 + 0.3 * torch.sin(2 * math.pi * col(p["light_freq"]) * t + col(p["light_phase"]))
    band = 0.65 + 0.6 * torch.exp(-((x - col(p["light_x0"]) - 1.2 * tn) ** 2) / 0.3)
    gains = [torch.ones_like(flicker), flicker, 0.35 + 0.65 * tn + 0 * flicker, 1.0 - 0.65 * tn + 0 * flicker, band]
    gain = torch.zeros(B, frames, height, width, device=device)
    for i, g in enumerate(gains):
        gain = gain + (light == i).float() * g.expand(B, frames, height, width)
    video = ((video + 1) * 0.5 * gain[:, None]).clamp(0, 1) * 2 - 1
    return video


def tokens_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Condition tokens [B, TEXT_LEN] (long) naming background, lighting, then class/motion per sprite."""
    B = params["bg"].shape[0]
    tokens = torch.zeros(B, TEXT_LEN, dtype=torch.long)
    tokens[:, 0] = params["bg"] + TOKEN[BACKGROUNDS[0]]
    tokens[:, 1] = params["light"] + TOKEN[LIGHTING[0]]
    for s in range(MAX_SPRITES):
        active = params["active"][:, s]
        tokens[:, 2 + 2 * s] = torch.where(active, params["cls"][:, s] + TOKEN[CLASSES[0]], 0)
        tokens[:, 3 + 2 * s] = torch.where(active, params["motion"][:, s] + TOKEN[MOTIONS[0]], 0)
    return tokens


def sample_batch(
    batch: int, seed: int, frames: int = 16, height: int = 32, width: int = 48, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(video [B, 3, F, H, W] float32 in [-1, 1] on ``device``, tokens [B, TEXT_LEN] long on ``device``)."""
    params = _params(batch, seed)
    return render(params, frames, height, width, device), tokens_of(params).to(device)
