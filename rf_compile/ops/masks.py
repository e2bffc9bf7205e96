"""The masks the op takes: a key-padding mask (the kernel's additive bias) and an outer product's row factor.

SDPA sites whose mask is neither stay dense (``passes.masks`` proves which a mask is); these helpers turn
the two accepted forms into what each executor and a dense call need.
"""

from __future__ import annotations

import torch


def is_key_padding_mask(shape: tuple[int, ...] | torch.Size, seq_len: int) -> bool:
    """Whether an SDPA mask of this shape varies only along the key dimension (and batch)."""
    shape = tuple(shape)
    if shape[-1:] != (seq_len,):
        return False
    if len(shape) == 4:
        return shape[1] == 1 and shape[2] == 1
    return all(s == 1 for s in shape[:-1])


def key_padding_bias(attn_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """Turn a mask that only varies along keys ([B|1, 1, 1, N]) into an additive float [B, N] bias.

    Returns None for no mask; raises ValueError for masks of any other shape.
    """
    if attn_mask is None:
        return None
    if not is_key_padding_mask(attn_mask.shape, seq_len):
        raise ValueError(f"attention mask of shape {tuple(attn_mask.shape)} is not a key-padding mask [B|1, 1, 1, N]")
    mask = attn_mask.reshape(attn_mask.shape[0] if attn_mask.dim() == 4 else 1, seq_len).expand(batch, seq_len)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float().contiguous()


def rows_attending(query_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B|1, 1, N, 1]: query rows that see any key under a row factor of an outer-product mask.

    A row whose factor is False (boolean) or -inf (additive) is fully masked; SDPA returns zeros
    for it. A finite additive row factor shifts every score of the row alike: no effect.
    """
    return query_mask if query_mask.dtype == torch.bool else torch.isfinite(query_mask)


def zero_masked_rows(out: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    """``out`` with the rows no key is visible to set to zero in place, as SDPA gives them."""
    if query_mask is None:
        return out
    return out.masked_fill_(~rows_attending(query_mask), 0.0)


def full_mask(attn_mask: torch.Tensor | None, query_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The SDPA mask a (key mask, row mask) pair stands for (dense calls of such sites)."""
    if query_mask is None:
        return attn_mask
    rows = rows_attending(query_mask)
    if attn_mask is None:
        return rows
    if attn_mask.dtype == torch.bool:
        return attn_mask & rows
    return attn_mask.masked_fill(~rows, float("-inf"))
