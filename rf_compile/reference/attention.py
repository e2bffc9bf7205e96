"""Masked attention written out in plain PyTorch: the golden model of the kernels and executors.

``masked_attention`` takes a bool mask (from ``reference.masks``, built from the paper's
definitions) and computes ``softmax(q k^T * scale + bias) v`` over the allowed keys, by default
in float64. It knows nothing of plans or kernels. A row with no allowed key gives zeros (the
kernel's convention; SDPA would give NaN).
"""

from __future__ import annotations

import torch


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Attention of q [..., R, D] over k, v [..., N, D] where ``mask`` (bool, broadcast to [..., R, N]) allows.

    Parameters
    ----------
    scale:
        Softmax scale, default ``1 / sqrt(D)``.
    key_bias:
        Optional additive bias broadcast to the scores (a float [B, N] key-padding bias becomes
        ``key_bias[:, None, None, :]`` for 4-D inputs).
    dtype:
        Computation dtype (float64 by default: the golden reference); ``None`` computes in the
        input dtype (scores in float32 at least), the low-precision reference of a three-way check.

    Returns
    -------
    Tensor
        [..., R, D] in the computation dtype.
    """
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-1, -2)
    if dtype is None:
        scores = scores.float()
    if key_bias is not None:
        if key_bias.dim() == 2 and scores.dim() == 4:
            key_bias = key_bias[:, None, None, :]
        scores = scores + key_bias.to(scores.dtype)
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = (scores == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs.to(v.dtype) @ v
