"""Which executor runs a call (the Triton kernel or the PyTorch reference, or neither: dense SDPA) and running
a plan table on it.

One policy for the compile-time pass and the run-time op, so that what the report says at compile time is
what the op does.
"""

from __future__ import annotations

import torch

from rf_compile.ops.masks import is_key_padding_mask, key_padding_bias
from rf_compile.ops.torch_attention import torch_sparse_attention
from rf_compile.plan import KERNEL_HEAD_DIMS, PlanTable

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def kernel_unsupported_reason(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> str | None:
    """Why the Triton kernel cannot run this call (None if it can). Works on fake tensors too."""
    if q.device.type != "cuda":
        return f"tensors on {q.device.type}, the kernel needs CUDA"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (kernel: float16, bfloat16)"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (kernel: {', '.join(map(str, KERNEL_HEAD_DIMS))})"
    if attn_mask is not None and not is_key_padding_mask(attn_mask.shape, k.shape[-2]):
        return f"attention mask of shape {tuple(attn_mask.shape)} (kernel: key-padding masks [B|1, 1, 1, N])"
    return None


def choose_kernel(
    option: str, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, precision: str = "bf16"
) -> tuple[str, str]:
    """``("triton" | "reference", "")``, or ``("", reason)`` when the call must stay dense SDPA.

    One policy for the compile-time pass and the run-time op: the O(N^2) PyTorch path is no option
    at GPU sizes, so a CUDA call the kernel cannot run stays dense rather than going to it. The
    8-bit precisions (``"fp8"``, ``"int8"``) run on the Triton kernel with TMA loads only.
    """
    kernel, reason = _kernel_for(option, q, k, attn_mask)
    if kernel and precision != "bf16":
        from rf_compile.kernels.block_sparse import fp8_runs

        if kernel != "triton" or not fp8_runs(q.device):
            return "", (f"precision={precision!r} needs the Triton kernel on a Hopper GPU (TMA loads); this call has "
                        f"the {kernel} kernel on {q.device.type}: use precision='bf16'")
    return kernel, reason


def _kernel_for(option: str, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[str, str]:
    if option == "reference":
        return "reference", ""
    reason = kernel_unsupported_reason(q, k, attn_mask)
    if reason is None:
        return "triton", ""
    if q.device.type == "cuda" or option == "triton":
        return "", f"kernel does not support {reason}"
    return "reference", ""


def run_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: PlanTable,
    variant_of_head: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    kernel: str,
    out: torch.Tensor | None = None,
    precision: str = "bf16",
) -> torch.Tensor:
    """Each (batch, head) under its plan (a row of ``table``): the Triton kernel or the PyTorch path.

    ``kernel`` is ``"triton"`` or ``"reference"`` (``choose_kernel``, which also vetted ``precision``);
    ``attn_mask`` a key-padding mask.
    """
    if kernel == "triton":
        from rf_compile.kernels.block_sparse import block_sparse_attention

        bias = key_padding_bias(attn_mask, q.shape[0], k.shape[-2])
        return block_sparse_attention(q, k, v, table, variant_of_head.int(), scale=scale, key_bias=bias, out=out,
                                      precision=precision)
    result = torch_sparse_attention(q, k, v, table, variant_of_head, attn_mask, scale)
    return result if out is None else out.copy_(result)
