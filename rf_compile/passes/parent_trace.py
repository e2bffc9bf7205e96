"""The layout of a site whose graph holds only part of a model, from one trace of the calling model.

Under regional compilation (``compile_repeated_blocks``) a block's graph starts from flattened
tokens: the patch embedding that makes the video grid runs in the uncompiled parent. On the first
call of each shape, the op finds that parent on the Python stack (the outermost module holding the
block's parameters), records its forward on fake tensors (no memory, no compute: a
``TorchFunctionMode`` writes every torch call into an FX graph) and reads the layouts of the
parent's own attention sites with ``infer_layout``. The block's site takes the layout of the
parent's self-attention sites of the same length: the layout still comes from the model's own
computation, never from names.

Data-dependent steps (a Python branch on a tensor, ``.item()``, a boolean-mask index, ``nonzero``)
have no fake answer. The trace then takes the answer of this very call: it replays the recorded ops
that the step depends on with the call's real inputs and parameters (``_Recorder.on_real_values``),
usually a few small ops on masks, and goes on with a fake of the real result. Such a trace holds
the call's data, so it is made again when a later call of the same shapes has another sequence
length (another prompt length).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from rf_compile.layout import VideoLayout
from rf_compile.passes.infer_layout import infer_site_layout
from rf_compile.passes.nodes import example, is_impure, is_sdpa, sdpa_arguments

log = logging.getLogger(__name__)

# What fake tensors raise where a value, not a shape, decides (a branch, ``.item()``, ``nonzero``).
_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)


@dataclasses.dataclass
class _Trace:
    """One recorded call of a model: its graph and self-attention sites, or why it could not be traced."""

    graph: RecordedGraph | None = None
    sites: list[tuple[int, torch.fx.Node]] = dataclasses.field(default_factory=list)  # (query length, SDPA node)
    error: str = ""
    read_values: bool = False  # a data-dependent step took this call's real values


# Per model: {input shapes: trace}.
_TRACES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, _Trace]] = weakref.WeakKeyDictionary()


class RecordedGraph:
    """An FX graph recorded from eager calls (what ``infer_layout`` needs of a GraphModule)."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph


class _Recorder(TorchFunctionMode):
    """Write every torch function call and its (fake) result into an FX graph; answer data-dependent
    steps with the call's real values."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.graph = torch.fx.Graph()
        self.nodes: dict[int, torch.fx.Node] = {}
        self.alive: list[Any] = []  # keeps recorded values alive, so their ids stay unique
        self.unreplayable: set[torch.fx.Node] = set()  # bases of views changed in place
        self.read_values = False

    def add_input(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        """A model input: ``fake`` is traced, ``real`` answers data-dependent steps."""
        if id(fake) not in self.nodes:
            node = self.graph.placeholder(f"input_{len(self.nodes)}")
            node.meta["example_value"], node.meta["real"] = fake, real
            self._remember(fake, node)

    def _node(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        node = self.nodes.get(id(value))
        if node is None:  # a parameter or buffer (real), or a tensor made where no torch call was seen
            node = self.graph.placeholder(f"input_{len(self.nodes)}")
            node.meta["example_value"] = value
            if not isinstance(value, FakeTensor):
                node.meta["real"] = value
            self._remember(value, node)
        return node

    def _remember(self, value: Any, node: torch.fx.Node) -> None:
        self.nodes[id(value)] = node
        self.alive.append(value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except _DATA_DEPENDENT:
            out = self.on_real_values(func, args, kwargs)
        if func is torch.Tensor.__setitem__:  # recorded as a call that returns the changed tensor
            func, out = _assign, args[0]
        produced = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if not produced or getattr(func, "__name__", "") == "__set__":
            return out
        target = operator.getitem if func is torch.Tensor.__getitem__ else func
        node = self.graph.call_function(target, *_map_tensors(self._node, (args, kwargs)))
        node.meta["example_value"] = out
        if _mutates(node) and isinstance(args[0], torch.Tensor) and args[0]._base is not None:
            # A replay would not see this change through the view's base: it must not read the base.
            self.unreplayable.add(self._node(args[0]._base))
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

    def on_real_values(self, func, args: tuple, kwargs: dict) -> Any:
        """``func`` on the real values of its arguments (replayed from the recorded graph); tensors in
        the result come back as fakes of the real ones."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a data-dependent step of the model cannot be replayed during CUDA graph capture")
        nodes = _map_tensors(self._node, (args, kwargs))
        needed: list[torch.fx.Node] = []
        torch.fx.node.map_arg(nodes, needed.append)
        real = _replay(self.graph, needed, self.unreplayable)
        real_args, real_kwargs = torch.fx.node.map_arg(nodes, real.__getitem__)
        with unset_fake_temporarily():
            out = func(*real_args, **real_kwargs)
        self.read_values = True
        return tree_map(lambda x: self.fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, out)


def _map_tensors(fn: Any, tree: Any) -> Any:
    """``tree`` with ``fn`` applied to its tensors, also to those inside slices (``x[:, :n]``)."""

    def leaf(x: Any) -> Any:
        if isinstance(x, slice):
            return slice(*(leaf(v) for v in (x.start, x.stop, x.step)))
        return fn(x) if isinstance(x, torch.Tensor) else x

    return tree_map(leaf, tree)


def _assign(tensor: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``tensor[index] = value`` as a call that returns ``tensor`` (how the recorder writes item assignment)."""
    tensor[index] = value
    return tensor


def _mutates(node: torch.fx.Node) -> bool:
    return node.target is _assign or is_impure(node)


def _replay(graph: torch.fx.Graph, wanted: list[torch.fx.Node], unreplayable: set) -> dict[torch.fx.Node, Any]:
    """Real values of the ``wanted`` nodes: their recorded ancestors run on the placeholders' real
    values, under a forked random state (a replay draws no numbers from the model's generators)."""
    needed: set[torch.fx.Node] = set()
    stack = list(wanted)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    order = [node for node in graph.nodes if node in needed]
    blocked = needed & unreplayable
    if blocked:
        name = next(iter(blocked)).name
        raise RuntimeError(f"a data-dependent step reads {name}, changed in place through a view")
    missing = [node.name for node in order if node.op == "placeholder" and "real" not in node.meta]
    if missing:
        raise RuntimeError(f"a data-dependent step reads {missing[0]}, a tensor made outside any recorded torch call")
    # A replay must not change the caller's inputs: copies, where an op changes a tensor in place
    # (parameters are not copied: a forward that changes its own weights is not replayed faithfully anyway).
    copy_inputs = any(_mutates(node) for node in order)
    last_use = {source: node for node in order for source in node.all_input_nodes}
    keep = set(wanted)
    env: dict[torch.fx.Node, Any] = {}
    with torch.random.fork_rng(devices=_cuda_devices()), unset_fake_temporarily():
        for node in order:
            if node.op == "placeholder":
                value = node.meta["real"]
                copy = copy_inputs and not isinstance(value, torch.nn.Parameter)
                env[node] = value.clone() if copy else value
            else:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                env[node] = node.target(*args, **kwargs)
            for source in node.all_input_nodes:  # free what no later node of the replay reads
                if last_use[source] is node and source not in keep:
                    del env[source]
    return {node: env[node] for node in wanted}


def _cuda_devices() -> list[int]:
    """The CUDA devices whose random state a replay keeps (the current one, where CUDA is in use)."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def trace_model(model: torch.nn.Module, args: tuple, kwargs: dict, seq_len: int | None = None) -> _Trace:
    """The recorded call ``model(*args, **kwargs)`` on fake tensors, cached per input shapes. A cached
    trace that took real values is made again from this call if it has no self-attention site of
    ``seq_len`` tokens (the call's data changed a length)."""
    shapes = tuple(
        (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x in tree_flatten((args, kwargs))[0]
    )
    cache = _TRACES.setdefault(model, {})
    found = cache.get(shapes)
    stale = found is not None and found.read_values and all(length != seq_len for length, _ in found.sites)
    if found is None or (seq_len is not None and stale):
        found = cache[shapes] = _trace(model, args, kwargs)
    return found


@contextlib.contextmanager
def _class_forwards(model: torch.nn.Module) -> Iterator[None]:
    """Run the modules' own ``forward`` methods: a ``forward`` set on an instance (diffusers' cache hooks,
    which count calls and keep outputs between steps) would have a trace change its state."""
    saved = {module: module.__dict__.pop("forward") for module in model.modules() if "forward" in module.__dict__}
    try:
        yield
    finally:
        for module, forward in saved.items():
            module.forward = forward


def _trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> _Trace:
    # Static shapes and no shape environment: a data-dependent step raises, and takes the call's value.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
    recorder = _Recorder(fake_mode)

    def fake(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        faked = fake_mode.from_tensor(x)
        recorder.add_input(faked, x)
        return faked

    fake_args, fake_kwargs = tree_map(fake, (args, kwargs))
    try:
        with torch.compiler.set_stance("force_eager"), torch.no_grad(), _class_forwards(model), fake_mode, recorder:
            model.forward(*fake_args, **fake_kwargs)  # forward, not __call__: the model's own hooks stay out
    except Exception as error:  # a model we cannot trace keeps its sites dense, with this reason
        log.debug("tracing %s failed: %s", type(model).__name__, error)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        name = type(model).__name__
        return _Trace(error=f"tracing {name} on fake tensors failed: {type(error).__name__}: {first_line}")
    trace = _Trace(graph=RecordedGraph(recorder.graph), read_values=recorder.read_values)
    for node in recorder.graph.nodes:
        if is_sdpa(node):
            q, k = (example(sdpa_arguments(node)[name]) for name in ("query", "key"))
            if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] == k.shape[2]:
                trace.sites.append((q.shape[2], node))
    return trace


def layout_from_calling_model(model: torch.nn.Module | None, call: tuple | None, seq_len: int) -> VideoLayout | str:
    """The layout of a ``seq_len``-token site called inside ``model``, from a trace of ``model``'s call."""
    if model is None or call is None:
        return (
            "its graph holds no video grid (regional compilation) and no calling model was found on the stack; "
            "compile the whole model, or pass options={'layout': (frames, height, width, prefix, suffix)}"
        )
    trace = trace_model(model, *call, seq_len=seq_len)
    if trace.error:
        return trace.error
    candidates = {infer_site_layout(trace.graph, node) for length, node in trace.sites if length == seq_len}
    layouts = {c for c in candidates if isinstance(c, VideoLayout)}
    name = type(model).__name__
    if len(layouts) == 1:
        return next(iter(layouts))
    if len(layouts) > 1:
        found_text = ", ".join(sorted(layout.describe() for layout in layouts))
        return f"ambiguous: {name}'s {seq_len}-token attention sites have different layouts ({found_text})"
    reasons = "; ".join(sorted(str(c) for c in candidates)) or "none has that length"
    return f"no self-attention site of {name} over {seq_len} tokens has a video layout ({reasons})"
