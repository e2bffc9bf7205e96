"""What every pass reads off an FX node: SDPA calls, their arguments by name, recorded values.

One copy of these helpers for ``find_attention``, ``infer_layout``, ``masks`` and ``rewrite``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

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
