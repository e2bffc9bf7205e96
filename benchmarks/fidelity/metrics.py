"""Image-quality metrics of sampled videos: PSNR and SSIM (Wang et al. 2004, Gaussian window).

Videos are [B, C, F, H, W] with values in [-1, 1] (``data_range=2``). SSIM is computed per frame
and channel over "valid" windows (no padding) and averaged. Both return one float per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB per sample, float64 [B]: ``10 log10(range^2 / MSE)`` (inf where identical)."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian, float64 [size]."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM per sample, float64 [B], of videos [B, C, F, H, W] (or images [B, C, H, W]).

    The window shrinks to the largest odd size that fits small frames.
    """
    if x.dim() == 4:
        x, ref = x[:, :, None], ref[:, :, None]
    B, C, Fr, H, W = x.shape
    size = min(size, H - (H % 2 == 0), W - (W % 2 == 0))
    g = gaussian_window(size, sigma).to(x.device)
    window = (g[:, None] * g[None, :])[None, None]  # [1, 1, s, s]
    to_images = lambda t: t.double().permute(0, 2, 1, 3, 4).reshape(B * Fr * C, 1, H, W)  # noqa: E731
    a, b = to_images(x), to_images(ref)
    blur = lambda t: F.conv2d(t, window)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(B, -1).mean(1)
