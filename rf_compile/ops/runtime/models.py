"""State per compiled model instance: its sites, each site's dense warm-up and ARM schedule, the clock hook."""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.ops.runtime.call_stack import calling_frame_arguments, owning_module
from rf_compile.ops.runtime.clock import step_clock
from rf_compile.ops.runtime.shapes import DENSE, CallPlan, ShapeState
from rf_compile.ops.runtime.sites import SiteSpec
from rf_compile.ops.runtime.step_count import StepCount
from rf_compile.ops.runtime.summaries import summarize
from rf_compile.persistent import persistent
from rf_compile.plan import Variant


def _progress(step: torch.Tensor, first: int | torch.Tensor, stop: int | torch.Tensor) -> torch.Tensor:
    """float64 scalar: 0 at the first sparse step ``first``, 1 at the last (``stop - 1``), on the device."""
    span = stop - first - 1  # host ints (option num_steps) or device tensors: no tensor made from the host
    span = span.clamp_min(1) if isinstance(span, torch.Tensor) else max(span, 1)
    return ((step - first).double() / span).clamp(0.0, 1.0)


@dataclasses.dataclass
class SiteState:
    """One site of one model instance: its call counter (warm-up without a timestep) and shapes."""

    spec: SiteSpec
    model: ModelState
    name: str  # the site's path in the model (a regional graph's site, prefixed by its block's path)
    index: int = 0  # order of the site's first call among the model's sites (``dense_layers``)
    counter: torch.Tensor | None = None  # int64 scalar: calls, for graphs with no timestep
    shapes: dict[tuple[VideoLayout, int], ShapeState] = dataclasses.field(default_factory=dict)
    dense_reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # shapes that stayed dense

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
            candidates = len(self.spec.config.candidates) if self.spec.config.mode == "calibrate" else 0
            shape = self.shapes[(layout, B)] = ShapeState.new(layout, B, H, variants, q.device, made, candidates)
        step = self._step(q.device, timestep)
        config, steps = self.spec.config, self.model.step_count
        ticked = timestep is not None or self.model.ticks_clock  # else the step is this site's call counter
        dtype = step_clock(q.device).dtype if ticked else None
        first_sparse = steps.warmup(config, q.device, dtype)
        dense = step < first_sparse
        stop = steps.last_steps_start(config, q.device, dtype) if config.dense_last_steps or config.ramp else None
        if config.dense_last_steps:
            dense = dense | (step >= stop)
        progress = _progress(step, first_sparse, stop) if config.ramp else None
        if self.index < config.dense_layers:
            dense = torch.ones_like(dense)
        shape.calls += 1
        shape.dense_calls += dense
        run_arm = ~dense
        arm_every = self.spec.config.arm_every
        if arm_every > 1:  # this call's index among the sparse ones (calls - dense_calls - 1) is a multiple of it
            run_arm &= (shape.calls - shape.dense_calls) % arm_every == 1
        shape.arm_runs += run_arm
        return CallPlan(shape, dense, run_arm, progress)

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
        total, by_layout = summarize(self.shapes.values())
        config = self.spec.config
        middle = config.ramped_sparsity
        ramp = {"sparsity_range": [middle - config.ramp, middle + config.ramp]} if config.ramp else {}
        return {
            "model": self.model.name,
            "site": self.name,
            "layout": ", ".join(by_layout) or (self.spec.layout.describe() if self.spec.layout else ""),
            "layout_source": self.spec.layout_source,
            **self.model.step_count.describe(self.spec.config),
            **total,
            "dense_shapes": dict(self.dense_reasons),
            "by_layout": by_layout,
            **ramp,  # predicted blocks' sparsity at the first and the last sparse step (``sparsity_ramp``)
        }


@dataclasses.dataclass(eq=False)
class ModelState:
    """The sites of one model instance, named for people (``WanTransformer3DModel#2``)."""

    name: str
    module: weakref.ref | None
    # By (site path, config): a recompile of the same model (another shape) continues the same site.
    sites: dict[tuple[str, RainFusionConfig], SiteState] = dataclasses.field(default_factory=dict)
    ticks_clock: bool = False  # a hook on the model ticks the step clock from its timestep argument
    clock_checked: bool = False
    step_count: StepCount = dataclasses.field(default_factory=StepCount)  # of the video now, for the warm-up

    def site(self, spec: SiteSpec, prefix: str) -> SiteState:
        name = prefix + spec.name
        state = self.sites.get((name, spec.config))
        if state is None:
            # The order among this config's sites: a model compiled before with other options keeps those too.
            index = sum(config == spec.config for _, config in self.sites)
            state = self.sites[(name, spec.config)] = SiteState(spec, self, name, index=index)
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
                model.step_count.watch(module)  # the calling pipeline's step count, from now on
        found = _BY_OWNER[owner] = (model, qualified.removeprefix("_orig_mod."))
    model, qualified = found
    prefix = qualified[: -len(spec.owner_path)] if spec.owner_path and qualified.endswith(spec.owner_path) else ""
    return model.site(spec, prefix)


def _new_name(cls: str) -> str:
    _CLASS_COUNTS[cls] = _CLASS_COUNTS.get(cls, 0) + 1
    return f"{cls}#{_CLASS_COUNTS[cls]}"


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


def all_models() -> list[ModelState]:
    """Every model instance with sites (the sites of no known model first)."""
    return [_UNOWNED, *sorted({model for model, _ in _BY_OWNER.values()}, key=lambda s: s.name)]
