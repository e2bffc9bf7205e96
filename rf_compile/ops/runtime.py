"""Run-time state of the op: the step clock, dense warm-up, ARM reuse and statistics, per model.

Everything that changes from call to call is a device tensor updated by device operations, so a
call never makes the host wait and a CUDA graph (``mode="reduce-overhead"`` / ``"max-autotune"``)
replays exactly the decisions eager execution makes:

- the *step clock* (one per device) turns the model's ``timestep`` input into a step index: a new
  value is a new step, a value above the last starts a new video;
- a call is dense while that step is below ``ceil(dense_warmup * num_steps)``; "dense" is one more
  plan variant, selected on the device;
- the ARM re-runs every ``arm_every``-th sparse call; in between its last decision is reused;
- statistics accumulate in device counters; only ``stats()`` reads them (a host sync, off the hot path).

State belongs to a compiled model *instance*: the rewrite pass gives the op one of the model's
parameters (``owner``), and sites are kept per owner, so two models of one class (Wan 2.2's two
experts) never share counters or decisions. Tensors that outlive a call are allocated outside any
CUDA-graph memory pool (``rf_compile.persistent``), and reset in place (captured graphs keep
pointing at them).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.persistent import persistent
from rf_compile.plan import Pattern, Variant, variants_for

DENSE = Variant(Pattern.DENSE)

# A site's layout for one call, from (size symbol -> value, calling model, sequence length): a
# VideoLayout, or why the call must stay dense.
LayoutResolver = Callable[[dict, "torch.nn.Module | None", int], "VideoLayout | str"]


# -- the step clock ----------------------------------------------------------------------------------


class StepClock:
    """Denoising step of the current video, counted on the device from the model's timestep values."""

    def __init__(self, device: torch.device) -> None:
        self.last, self.step = persistent(
            lambda: (
                torch.full((), float("nan"), dtype=torch.float64, device=device),
                torch.zeros((), dtype=torch.int64, device=device),
            ),
            device,
        )

    def tick(self, timestep: torch.Tensor) -> torch.Tensor:
        """Advance on a new timestep value (restart on a larger one); returns the step (int64 scalar)."""
        t = timestep.reshape(-1)[0].to(device=self.last.device, dtype=torch.float64)
        new_video = torch.isnan(self.last) | (t > self.last)
        advanced = self.step + (t != self.last).long()
        self.step.copy_(torch.where(new_video, torch.zeros_like(self.step), advanced))
        self.last.copy_(t)
        return self.step

    def reset(self) -> None:
        self.last.fill_(float("nan"))
        self.step.zero_()


_CLOCKS: dict[torch.device, StepClock] = {}


def step_clock(device: torch.device) -> StepClock:
    """The clock of ``device`` (shared by every site and model: one denoising loop drives them all)."""
    clock = _CLOCKS.get(device)
    if clock is None:
        clock = _CLOCKS[device] = StepClock(device)
    return clock


# -- compile-time site specs ------------------------------------------------------------------------


@dataclasses.dataclass
class SiteSpec:
    """What the rewrite pass knows of one site: its name, config and layout (or how to find it)."""

    key: str
    name: str
    config: RainFusionConfig
    layout: VideoLayout | None = None  # static shapes: the layout
    resolver: LayoutResolver | None = None  # symbolic shapes / regional graphs: a layout per call sizes
    layout_source: str = "graph"
    variants: tuple[Variant, ...] = ()
    symbols: tuple = ()  # the size symbols whose values the op receives as ``sizes``
    owner_path: str = ""  # dotted path of the owner parameter from the graph's root module
    _layouts: dict[tuple, VideoLayout | str] = dataclasses.field(default_factory=dict, repr=False)

    MAX_LAYOUTS = 32  # distinct call shapes remembered per site

    def layout_for(self, sizes: tuple[int, ...], model: torch.nn.Module | None, seq_len: int) -> VideoLayout | str:
        """The layout of a call with these symbolic sizes and length (cached, bounded)."""
        if self.resolver is None:
            assert self.layout is not None
            return self.layout
        key = (sizes, seq_len)
        found = self._layouts.get(key)
        if found is None:
            found = self.resolver(dict(zip(self.symbols, sizes)), model, seq_len)
            if len(self._layouts) >= self.MAX_LAYOUTS:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = found
        return found


_SPECS: dict[str, SiteSpec] = {}
_LOCK = threading.Lock()


def register_site(
    name: str,
    layout: VideoLayout | None,
    config: RainFusionConfig,
    resolver: LayoutResolver | None = None,
    layout_source: str = "graph",
    symbols: tuple = (),
    owner_path: str = "",
) -> str:
    """Register a rewritten site; returns the key the op is called with.

    Give ``layout`` for a site whose shapes are static, else ``resolver``: it maps the sizes the
    op receives (values of ``symbols``) to a layout, or a reason to stay dense, on the first call
    of each shape.
    """
    if layout is None and resolver is None:
        raise ValueError(f"site {name!r} needs a layout or a resolver")
    with _LOCK:
        key, suffix = name, 1
        while key in _SPECS and not _same_spec(_SPECS[key], layout, config, resolver):
            suffix += 1
            key = f"{name}#{suffix}"
        if key not in _SPECS or resolver is not None:
            _SPECS[key] = SiteSpec(
                key, name, config, layout, resolver, layout_source, variants_for(config), symbols, owner_path
            )
        return key


def _same_spec(spec: SiteSpec, layout: VideoLayout | None, config: RainFusionConfig, resolver) -> bool:
    return resolver is None and spec.resolver is None and (spec.layout, spec.config) == (layout, config)


def get_spec(key: str) -> SiteSpec:
    try:
        return _SPECS[key]
    except KeyError:
        raise RuntimeError(
            f"rainfusion site {key!r} is not registered in this process; recompile the model "
            "with backend='rainfusion'"
        ) from None


# -- per-call state ------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShapeState:
    """Device state of one site for one (layout, batch size): decision cache and statistics."""

    layout: VideoLayout
    heads: int
    variants: tuple[Variant, ...]
    calls: torch.Tensor  # int64 scalars
    dense_calls: torch.Tensor
    arm_runs: torch.Tensor
    variant: torch.Tensor  # int64 [B, H]: the ARM's last decision
    recall: torch.Tensor  # float32 [B, H]: its estimated recall (NaN: textural)
    variant_counts: torch.Tensor  # int64 [H, P]
    recall_sums: torch.Tensor  # float64 [H, 2]: sum and count of estimated recalls
    kept: torch.Tensor  # float64 scalar: sum over sparse (batch, head) calls of the kept fraction
    block_density_sums: torch.Tensor  # float64 [H]: v2 kept block fraction per head
    sparse_heads: torch.Tensor  # float64 scalar: (batch, head) pairs computed sparse
    prepared: Any = None  # what the op built once for this shape (its plan table), made with the state

    @classmethod
    def new(
        cls,
        layout: VideoLayout,
        batch: int,
        heads: int,
        variants: tuple[Variant, ...],
        device: torch.device,
        prepare: Callable[[], Any] | None = None,
    ) -> ShapeState:
        """Zeroed state (and ``prepare()``'s result), all made outside CUDA-graph pools."""

        def make() -> ShapeState:
            def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
                return torch.zeros(shape, dtype=dtype, device=device)

            return cls(
                layout=layout,
                heads=heads,
                variants=variants,
                calls=zeros((), torch.int64),
                dense_calls=zeros((), torch.int64),
                arm_runs=zeros((), torch.int64),
                variant=zeros((batch, heads), torch.int64),
                recall=torch.full((batch, heads), float("nan"), device=device),
                variant_counts=zeros((heads, len(variants)), torch.int64),
                recall_sums=zeros((heads, 2), torch.float64),
                kept=zeros((), torch.float64),
                block_density_sums=zeros((heads,), torch.float64),
                sparse_heads=zeros((), torch.float64),
                prepared=prepare() if prepare is not None else None,
            )

        return persistent(make, device)

    def reset(self) -> None:
        for tensor in (self.calls, self.dense_calls, self.arm_runs, self.variant, self.variant_counts,
                       self.recall_sums, self.kept, self.block_density_sums, self.sparse_heads):  # fmt: skip
            tensor.zero_()
        self.recall.fill_(float("nan"))


@dataclasses.dataclass
class CallPlan:
    """The device-side decisions of one call."""

    shape: ShapeState
    dense: torch.Tensor  # bool scalar: a dense warm-up call
    run_arm: torch.Tensor  # bool scalar: the ARM decides anew in this call


@dataclasses.dataclass
class SiteState:
    """One site of one model instance: its call counter (warm-up without a timestep) and shapes."""

    spec: SiteSpec
    model: ModelState
    name: str  # the site's path in the model (a regional graph's site, prefixed by its block's path)
    counter: torch.Tensor | None = None  # int64 scalar: calls, for graphs with no timestep
    shapes: dict[tuple[VideoLayout, int], ShapeState] = dataclasses.field(default_factory=dict)
    dense_reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # shapes that stayed dense

    @property
    def warmup_steps(self) -> int:
        return self.spec.config.warmup_steps

    def begin(
        self,
        layout: VideoLayout,
        q: torch.Tensor,
        timestep: torch.Tensor | None,
        prepare: Callable[[tuple[Variant, ...]], Any] | None = None,
    ) -> CallPlan:
        """Count the call and decide on the device whether it is dense and whether the ARM runs.

        On the first call of a (layout, batch size), ``prepare(variants)`` builds what the op keeps
        for it (``ShapeState.prepared``), outside CUDA-graph pools with the state.
        """
        B, H = q.shape[:2]
        shape = self.shapes.get((layout, B))
        if shape is None:
            variants = (*self.spec.variants, DENSE)
            made = (lambda: prepare(variants)) if prepare is not None else None
            shape = self.shapes[(layout, B)] = ShapeState.new(layout, B, H, variants, q.device, made)
        step = self._step(q.device, timestep)
        dense = step < self.warmup_steps
        shape.calls += 1
        shape.dense_calls += dense.long()
        sparse_index = shape.calls - shape.dense_calls - 1  # of this call, when it is sparse
        run_arm = ~dense & (sparse_index % self.spec.config.arm_every == 0)
        shape.arm_runs += run_arm.long()
        return CallPlan(shape, dense, run_arm)

    def _step(self, device: torch.device, timestep: torch.Tensor | None) -> torch.Tensor:
        if timestep is not None:
            return step_clock(device).tick(timestep)
        if self.model.ticks_clock:  # no timestep in this graph: a hook on the model ticks the clock
            return step_clock(device).step
        if self.counter is None:
            self.counter = persistent(lambda: torch.zeros((), dtype=torch.int64, device=device), device)
        step = self.counter.clone()
        self.counter += 1
        return step

    def note_dense(self, reason: str) -> None:
        """A call at a shape with no layout (host-side: the decision is per shape, not per call)."""
        self.dense_reasons[reason] = self.dense_reasons.get(reason, 0) + 1

    def reset(self) -> None:
        if self.counter is not None:
            self.counter.zero_()
        for shape in self.shapes.values():
            shape.reset()
        self.dense_reasons.clear()

    def summary(self) -> dict:
        """Host-side statistics (reads the device counters: a sync)."""
        per_layout: dict[str, dict] = {}
        total: dict | None = None
        for shape in self.shapes.values():
            _accumulate(per_layout.setdefault(shape.layout.describe(), _empty_summary(shape)), shape)
            total = total or _empty_summary(shape)  # every shape of a site has its heads and variants
            _accumulate(total, shape)
        layouts = [_finish(entry) for entry in per_layout.values()]
        total = _finish(total) if total is not None else _finish_empty()
        return {
            "model": self.model.name,
            "site": self.name,
            "layout": ", ".join(per_layout) or (self.spec.layout.describe() if self.spec.layout else ""),
            "layout_source": self.spec.layout_source,
            **total,
            "dense_shapes": dict(self.dense_reasons),
            "by_layout": dict(zip(per_layout, layouts)),
        }


def _empty_summary(shape: ShapeState) -> dict:
    P, H = len(shape.variants), shape.heads
    return {
        "variants": shape.variants,
        "calls": 0,
        "dense_calls": 0,
        "arm_runs": 0,
        "counts": torch.zeros(H, P, dtype=torch.int64),
        "recall": torch.zeros(H, 2, dtype=torch.float64),
        "kept": 0.0,
        "blocks": torch.zeros(H, dtype=torch.float64),
        "sparse_heads": 0.0,
    }


def _accumulate(entry: dict, shape: ShapeState) -> None:
    entry["calls"] += int(shape.calls)
    entry["dense_calls"] += int(shape.dense_calls)
    entry["arm_runs"] += int(shape.arm_runs)
    entry["counts"] += shape.variant_counts.cpu()
    entry["recall"] += shape.recall_sums.cpu()
    entry["kept"] += float(shape.kept)
    entry["blocks"] += shape.block_density_sums.cpu()
    entry["sparse_heads"] += float(shape.sparse_heads)


def _finish(entry: dict) -> dict:
    """Counters of one layout -> the public summary fields."""
    variants, counts = entry["variants"], entry["counts"]
    heads = []
    if entry["variants"] and counts.sum() > 0:
        recall_sum, recall_count = entry["recall"].unbind(-1)
        for h, row in enumerate(counts.tolist()):
            per_pattern = {p.name.lower(): 0 for p in Pattern if p != Pattern.DENSE}
            bandwidths = []
            for variant, n in zip(variants, row):
                if variant.pattern == Pattern.DENSE:
                    continue
                per_pattern[variant.pattern.name.lower()] += n
                if variant.pattern != Pattern.TEXTURAL:
                    bandwidths += [variant.bandwidth] * n
            heads.append(
                {
                    **per_pattern,
                    "mean_bandwidth": sum(bandwidths) / len(bandwidths) if bandwidths else None,
                    "mean_recall": float(recall_sum[h] / recall_count[h]) if recall_count[h] else None,
                }
            )
    elif entry["blocks"].sum() > 0:
        calls_per_head = entry["sparse_heads"] / len(entry["blocks"])
        heads = [{"block_density": d / calls_per_head} for d in entry["blocks"].tolist()]
    density = entry["kept"] / entry["sparse_heads"] if entry["sparse_heads"] else None
    return {
        "calls": entry["calls"],
        "dense_calls": entry["dense_calls"],
        "sparse_calls": entry["calls"] - entry["dense_calls"],
        "arm_runs": entry["arm_runs"],
        "density": density,
        "sparsity": None if density is None else 1.0 - density,
        "heads": heads,
    }


def _finish_empty() -> dict:
    return {"calls": 0, "dense_calls": 0, "sparse_calls": 0, "arm_runs": 0, "density": None, "sparsity": None,
            "heads": []}  # fmt: skip


# -- models ---------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ModelState:
    """The sites of one model instance, named for people (``WanTransformer3DModel#2``)."""

    name: str
    module: weakref.ref | None
    # By (site path, config): a recompile of the same model (another shape) continues the same site.
    sites: dict[tuple[str, RainFusionConfig], SiteState] = dataclasses.field(default_factory=dict)
    ticks_clock: bool = False  # a hook on the model ticks the step clock from its timestep argument
    clock_checked: bool = False

    def site(self, spec: SiteSpec, prefix: str) -> SiteState:
        name = prefix + spec.name
        state = self.sites.get((name, spec.config))
        if state is None:
            state = self.sites[(name, spec.config)] = SiteState(spec, self, name)
        elif state.spec is not spec:  # a recompiled graph: its layouts, same counters
            state.spec = spec
        return state

    def summaries(self) -> dict[str, dict]:
        """Each site's summary by site path (``path#2`` for the same site compiled with other options)."""
        out: dict[str, dict] = {}
        for site in self.sites.values():
            key, n = site.name, 1
            while key in out:
                n += 1
                key = f"{site.name}#{n}"
            out[key] = site.summary()
        return out


_UNOWNED = ModelState(name="", module=None)
_BY_MODULE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # root module -> ModelState
_BY_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # owner parameter -> (ModelState, its qualified name)
_CLASS_COUNTS: dict[str, int] = {}


def site_state(spec: SiteSpec, owner: torch.Tensor | None) -> SiteState:
    """The state of site ``spec`` in the model instance that ``owner`` (one of its parameters) belongs to.

    Under regional compilation one block graph serves every block: the owner parameter's path in
    the model (``blocks.3.attn1.to_q.weight``) against its path in the graph (``attn1.to_q.weight``)
    gives the block's prefix, so each block keeps its own site.
    """
    if owner is None:
        return _UNOWNED.site(spec, "")
    found = _BY_OWNER.get(owner)
    if found is None:
        module, qualified = owning_module(owner)
        module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper lives shorter than the model
        if module is None:
            model = ModelState(name=_new_name("model"), module=None)
        else:
            model = _BY_MODULE.get(module)
            if model is None:
                model = _BY_MODULE[module] = ModelState(_new_name(type(module).__name__), weakref.ref(module))
        found = _BY_OWNER[owner] = (model, qualified.removeprefix("_orig_mod."))
    model, qualified = found
    prefix = qualified[: -len(spec.owner_path)] if spec.owner_path and qualified.endswith(spec.owner_path) else ""
    return model.site(spec, prefix)


def _new_name(cls: str) -> str:
    _CLASS_COUNTS[cls] = _CLASS_COUNTS.get(cls, 0) + 1
    return f"{cls}#{_CLASS_COUNTS[cls]}"


def calling_modules() -> list[torch.nn.Module]:
    """The nn.Modules whose ``__call__`` is on the Python stack now, outermost first."""
    call_codes = {torch.nn.Module._call_impl.__code__, torch.nn.Module._wrapped_call_impl.__code__}
    found: list[torch.nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in call_codes:
            module = frame.f_locals.get("self")
            if isinstance(module, torch.nn.Module) and all(module is not m for m in found):
                found.append(module)
        frame = frame.f_back
    return found[::-1]


def calling_frame_arguments(module: torch.nn.Module) -> tuple[tuple, dict] | None:
    """The (args, kwargs) ``module`` was called with, from its ``_call_impl`` frame on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is torch.nn.Module._call_impl.__code__ and frame.f_locals.get("self") is module:
            return tuple(frame.f_locals.get("args", ())), dict(frame.f_locals.get("kwargs", {}))
        frame = frame.f_back
    return None


def owning_module(owner: torch.Tensor) -> tuple[torch.nn.Module | None, str]:
    """The outermost module on the call stack holding the parameter ``owner``, and its name there."""
    for module in calling_modules():
        for name, parameter in module.named_parameters():
            if parameter is owner:
                return module, name
    return None, ""


def attach_clock(site: SiteState) -> None:
    """For a graph without a ``timestep`` input (regional compilation, a graph break): if the model's
    forward takes ``timestep``, a pre-hook ticks the step clock with it on every call, and this call's
    value ticks it now. Checked once per model."""
    model = site.model
    module = model.module() if model.module is not None else None
    if model.clock_checked or module is None:
        return
    model.clock_checked = True
    signature = inspect.signature(module.forward)
    if "timestep" not in signature.parameters:
        return

    def tick(_module, args, kwargs) -> None:
        timestep = signature.bind_partial(*args, **kwargs).arguments.get("timestep")
        if isinstance(timestep, torch.Tensor):
            step_clock(timestep.device).tick(timestep)

    module.register_forward_pre_hook(tick, with_kwargs=True)
    model.ticks_clock = True
    call = calling_frame_arguments(module)
    if call is not None:
        tick(module, *call)


# -- public -----------------------------------------------------------------------------------------------


def stats(model: torch.nn.Module | None = None) -> dict[str, dict]:
    """Per site: calls, dense/sparse calls, ARM runs, measured sparsity and per-head pattern counts.

    Without ``model``: every site of every model, keyed ``"<Model>#<n>/<site>"``. With ``model``
    (the module you compiled, or the compiled one): that model's sites, keyed by site name.
    Reading the device counters synchronises with the device: call it between steps, not inside.
    """
    if model is not None:
        target = getattr(model, "_orig_mod", model)
        for state in _all_models():
            module = state.module() if state.module is not None else None
            if module is not None and getattr(module, "_orig_mod", module) is target:
                return state.summaries()
        return {}
    return {
        (f"{state.name}/{name}" if state.name else name): summary
        for state in _all_models()
        for name, summary in state.summaries().items()
    }


def _all_models() -> list[ModelState]:
    return [_UNOWNED, *sorted({model for model, _ in _BY_OWNER.values()}, key=lambda s: s.name)]


def reset() -> None:
    """Zero every call counter and statistic, and restart the step clocks (in place: CUDA graphs keep them)."""
    for clock in _CLOCKS.values():
        clock.reset()
    for state in _all_models():
        for site in state.sites.values():
            site.reset()
