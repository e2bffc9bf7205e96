"""The layout of a site whose graph holds only part of a model, from one trace of the calling model.

Under regional compilation (``compile_repeated_blocks``) a block's graph starts from flattened
tokens: the patch embedding that makes the video grid runs in the uncompiled parent. On the first
call of each shape, the op finds that parent on the Python stack (the outermost module holding the
block's parameters), records its forward on fake tensors (no memory, no compute: a
``TorchFunctionMode`` writes every torch call into an FX graph) and reads the layouts of the
parent's own attention sites with ``infer_layout``. The block's site takes the layout of the
parent's self-attention sites of the same length: the layout still comes from the model's own
computation, never from names.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import weakref
from typing import Any

import sympy
import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from rf_compile.layout import VideoLayout
from rf_compile.passes.infer_layout import infer_site_layout
from rf_compile.passes.nodes import example, is_sdpa, same_size, sdpa_arguments

log = logging.getLogger(__name__)



@dataclasses.dataclass
class _Trace:
    """One recorded call of a model: its graph and self-attention sites, or why it could not be traced."""

    graph: RecordedGraph | None = None
    sites: list[tuple[Any, torch.fx.Node]] = dataclasses.field(default_factory=list)  # (query length, SDPA node)
    error: str = ""


# Per model: {input shapes: trace}.
_TRACES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, _Trace]] = weakref.WeakKeyDictionary()


class RecordedGraph:
    """An FX graph recorded from eager calls (what ``infer_layout`` needs of a GraphModule)."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph


class _Recorder(TorchFunctionMode):
    """Write every torch function call and its (fake) result into an FX graph."""

    def __init__(self) -> None:
        super().__init__()
        self.graph = torch.fx.Graph()
        self.nodes: dict[int, torch.fx.Node] = {}
        self.alive: list[Any] = []  # keeps recorded values alive, so their ids stay unique

    def _node(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        node = self.nodes.get(id(value))
        if node is None:
            node = self.graph.placeholder(f"input_{len(self.nodes)}")
            node.meta["example_value"] = value
            self._remember(value, node)
        return node

    def _remember(self, value: Any, node: torch.fx.Node) -> None:
        self.nodes[id(value)] = node
        self.alive.append(value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        produced = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if not produced or getattr(func, "__name__", "") == "__set__":
            return out
        target = operator.getitem if func is torch.Tensor.__getitem__ else func
        node = self.graph.call_function(target, tree_map(self._node, args), tree_map(self._node, kwargs))
        node.meta["example_value"] = out
        if isinstance(out, torch.Tensor):
            self._remember(out, node)
        elif isinstance(out, (tuple, list)):
            self.alive.append(out)
            for i, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    item_node = self.graph.call_function(operator.getitem, (node, i))
                    item_node.meta["example_value"] = item
                    self._remember(item, item_node)
        return out


def trace_model(model: torch.nn.Module, args: tuple, kwargs: dict) -> _Trace:
    """The recorded call ``model(*args, **kwargs)`` on fake tensors (cached per input shapes)."""
    shapes = tuple(
        (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x in tree_flatten((args, kwargs))[0]
    )
    cache = _TRACES.setdefault(model, {})
    if shapes not in cache:
        cache[shapes] = _trace(model, args, kwargs)
    return cache[shapes]


def _trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> _Trace:
    # Static input shapes; a shape environment only for data-dependent sizes (a text length read
    # from a mask), which become symbols solved later from the call's real sequence length.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True, shape_env=ShapeEnv())
    fake = tree_map(lambda x: fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, (args, kwargs))
    recorder = _Recorder()
    try:
        with torch.compiler.set_stance("force_eager"), torch.no_grad(), fake_mode, recorder:
            model.forward(*fake[0], **fake[1])  # forward, not __call__: the model's own hooks stay out
    except Exception as error:  # a model we cannot trace keeps its sites dense, with this reason
        log.debug("tracing %s failed: %s", type(model).__name__, error)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        name = type(model).__name__
        reason = f"tracing {name} on fake tensors failed: {type(error).__name__}: {first_line}"
        if "DataDependent" in type(error).__name__:  # e.g. a text length read with .item(): keep it in the graph
            reason += (
                "; compile the whole model with torch._dynamo.config.capture_scalar_outputs = True (and "
                "capture_dynamic_output_shape_ops = True) so that one graph holds the data-dependent length"
            )
        return _Trace(error=reason)
    trace = _Trace(graph=RecordedGraph(recorder.graph))
    for node in recorder.graph.nodes:
        if is_sdpa(node):
            q, k = (example(sdpa_arguments(node)[name]) for name in ("query", "key"))
            if isinstance(q, torch.Tensor) and q.dim() == 4 and same_size(q.shape[2], k.shape[2]):
                trace.sites.append((q.shape[2], node))
    return trace


def _bind_length(length: Any, seq_len: int) -> dict | None:
    """Bindings under which a traced query length equals the call's ``seq_len`` (None: it cannot)."""
    if isinstance(length, int):
        return {} if length == seq_len else None
    expr = length.node.expr
    if len(expr.free_symbols) != 1:
        return None
    (symbol,) = expr.free_symbols
    try:
        solutions = sympy.solve(sympy.Eq(expr, seq_len), symbol)
    except (NotImplementedError, TypeError, ValueError):
        return None
    values = [int(v) for v in solutions if getattr(v, "is_integer", False) and v >= 0]
    return {symbol: values[0]} if len(values) == 1 else None


def layout_from_calling_model(model: torch.nn.Module | None, call: tuple | None, seq_len: int) -> VideoLayout | str:
    """The layout of a ``seq_len``-token site called inside ``model``, from a trace of ``model``'s call."""
    if model is None or call is None:
        return (
            "its graph holds no video grid (regional compilation) and no calling model was found on the stack; "
            "compile the whole model, or pass options={'layout': (frames, height, width, prefix, suffix)}"
        )
    trace = trace_model(model, *call)
    if trace.error:
        return trace.error
    candidates: set = set()
    for length, node in trace.sites:
        bindings = _bind_length(length, seq_len)
        if bindings is not None:
            candidates.add(infer_site_layout(trace.graph, node, bindings))
    layouts = {c for c in candidates if isinstance(c, VideoLayout)}
    name = type(model).__name__
    if len(layouts) == 1:
        return next(iter(layouts))
    if len(layouts) > 1:
        found_text = ", ".join(sorted(layout.describe() for layout in layouts))
        return f"ambiguous: {name}'s {seq_len}-token attention sites have different layouts ({found_text})"
    reasons = "; ".join(sorted(str(c) for c in candidates)) or "none has that length"
    return f"no self-attention site of {name} over {seq_len} tokens has a video layout ({reasons})"
