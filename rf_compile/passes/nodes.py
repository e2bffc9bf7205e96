"""What every pass reads off an FX node: SDPA calls, their arguments by name, recorded values.

One copy of these helpers for ``find_attention``, ``infer_layout``, ``masks`` and ``rewrite``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Op names (``op_name``) of the ops the layout pass reads specially.
VIEW_OPS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as", "_unsafe_view"}
PERMUTE_OPS = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
CAT_OPS = {"cat", "concat", "concatenate"}
SPLIT_OPS = {"chunk", "split", "tensor_split", "split_with_sizes", "unbind"}
ALL_TO_ALL_OPS = {"all_to_all_single"}
WAIT_OPS = {"wait_tensor"}

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def is_sdpa(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """SDPA arguments of a node by name, whether they were passed positionally or by keyword."""
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def example(value: Any) -> Any:
    """The (fake) value Dynamo recorded for a node, or the constant itself."""
    if isinstance(value, torch.fx.Node):
        return value.meta.get("example_value", value.meta.get("val"))
    return value


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are equal for every value of the graph's symbols (no guard is added)."""
    return a == b if isinstance(a, int) and isinstance(b, int) else bool(statically_known_true(a == b))


def op_name(node: Any) -> str:
    """The name of what a node calls: ``"view"`` for ``x.view``, ``torch.Tensor.view`` or
    ``aten.view.default``; "" for anything that is no call."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method", "call_module"):
        return ""
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", "").split(".")[0]  # aten/c10d overloads: "name.default"


def is_impure(node: torch.fx.Node) -> bool:
    """FX's impurity, plus in-place ops (``t.copy_(x)``): FX keeps an unused in-place ``call_method``
    only if told, and dropping one loses the mutation (an ``all_gather`` into preallocated tensors)."""
    name = op_name(node)
    return node.is_impure() or (name.endswith("_") and not name.endswith("__"))


def permutation(node: torch.fx.Node, ndim: int) -> list[int] | None:
    """For each output dimension of a permute / transpose / movedim node, its input dimension.

    The op is replayed on a meta tensor whose sizes name the dimensions; None if it cannot be.
    """
    primes = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if ndim > len(primes):
        return None
    probe = torch.empty(primes[:ndim], device="meta")
    op = getattr(probe, node.target) if node.op == "call_method" else functools.partial(node.target, probe)
    try:
        result = op(*node.args[1:], **node.kwargs)
    except (TypeError, RuntimeError, IndexError):
        return None
    return [primes.index(size) for size in result.shape]


# How the frame of a diffusers hook reaches the module it wraps: through a forward's closure (context
# parallelism) or through the hook's function reference, when the frame is the hook's ``new_forward``
# (cache hooks: ``fn_ref.original_forward.__self__``). Neither is part of the module's path in the model.
_HOOK_CLOSURE = re.compile(r"(\.forward)?(\.func)?\.__closure__\.\d+\.cell_contents(\.forward)?\.__self__(?=\.|$)")
_HOOK_REFERENCE = re.compile(r"^fn_ref\.(original_)?forward\.(func\.)?__self__(\.|$)")


def without_hooks(path: str) -> str:
    """A dotted module or parameter path with the steps through diffusers hooks taken out."""
    return _HOOK_REFERENCE.sub("", _HOOK_CLOSURE.sub("", path))
