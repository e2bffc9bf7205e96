"""The dense warm-up's step count: the calling pipeline's own (per video), option ``num_steps``, or 50.

A small module calls the op eagerly from a pipeline-like loop (an object with a ``scheduler`` and a
local ``timesteps``, as diffusers' pipelines are written); the compiled diffusers pipelines are in
``test_pipelines``.
"""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rf_compile import RainFusionConfig, VideoLayout
from rf_compile.ops.attention import attention
from rf_compile.ops.runtime.models import site_state
from rf_compile.ops.runtime.sites import get_spec, register_site
from rf_compile.ops.runtime.stats import reset, stats
from rf_compile.ops.runtime.step_count import _count_runs

LAYOUT = VideoLayout(2, 4, 4)


class Attention(torch.nn.Module):
    """One rewritten site, as a compiled model runs it: the op with one of the model's parameters."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key, self.weight = key, torch.nn.Parameter(torch.zeros(1))
        self.q = torch.randn(1, 2, LAYOUT.seq_len, 8)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        q = self.q
        return attention(q, q, q, None, None, timestep, self.weight, None, self.key, [])


class Pipeline:
    """Written like a diffusers pipeline: the loop's ``timesteps`` are a local of ``__call__``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.scheduler = model, FlowMatchEulerDiscreteScheduler(shift=3.0)

    def __call__(self, num_inference_steps: int) -> None:
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        for t in timesteps:
            for _ in range(2):  # classifier-free guidance as two calls: one step
                self.model(t.expand(1))


def _model(name: str, **options) -> tuple[Attention, str]:
    key = register_site(name, LAYOUT, RainFusionConfig(**{"dense_warmup": 0.5, **options}))
    return Attention(key), key


def _video_dense_calls(key: str, run) -> int:
    before = stats()
    run()
    (entry,) = [e for name, e in stats().items() if name.endswith(key)]
    (previous,) = [e for name, e in before.items() if name.endswith(key)] or [{"dense_calls": 0}]
    return entry["dense_calls"] - previous["dense_calls"]


def test_warmup_follows_each_videos_pipeline_step_count():
    reset()
    model, key = _model("step_count.pipeline")
    pipe = Pipeline(model)
    for steps in (4, 2, 7):  # per video: ceil(0.5 * steps) dense steps, two calls each
        assert _video_dense_calls(key, lambda steps=steps: pipe(steps)) == 2 * math.ceil(0.5 * steps)
    (entry,) = stats(model).values()
    assert entry["num_steps_from"] == "pipeline Pipeline timesteps: 7 steps"
    assert (entry["num_steps"], entry["warmup_steps"]) == (7, 4)


def test_threshold_is_one_device_tensor_updated_in_place():
    """CUDA graphs replay reads of the same tensor: a new video must change its value, not replace it."""
    reset()
    model, key = _model("step_count.in_place")
    pipe = Pipeline(model)
    pipe(4)
    state = site_state(get_spec(key), model.weight)
    threshold = state.model.step_count.warmup(state.spec.config, torch.device("cpu"))
    assert isinstance(threshold, torch.Tensor) and int(threshold) == 2
    pipe(10)
    assert state.model.step_count.warmup(state.spec.config, torch.device("cpu")) is threshold
    assert int(threshold) == 5


def test_outside_a_pipeline_the_count_is_the_default():
    reset()
    model, key = _model("step_count.default")
    Pipeline(model)(2)
    # Then the model alone: a new video (its first timestep is above the last), with 50 steps again.
    dense = _video_dense_calls(key, lambda: [model(torch.tensor([999.0 - i])) for i in range(30)])
    assert dense == math.ceil(0.5 * 50)
    (entry,) = stats(model).values()
    assert entry["num_steps_from"] == "default: 50 steps"


def test_option_num_steps_overrides_the_pipeline():
    reset()
    model, key = _model("step_count.option", num_steps=10)
    pipe = Pipeline(model)
    # 8 steps: ceil(0.5 * 10) = 5 dense steps from the option, not ceil(0.5 * 8) = 4 from the pipeline
    assert _video_dense_calls(key, lambda: pipe(8)) == 2 * 5
    (entry,) = stats(model).values()
    assert entry["num_steps_from"] == "option num_steps: 10 steps"


def test_dense_last_steps_count_back_from_the_pipelines_steps():
    reset()
    model, key = _model("step_count.last", dense_last_steps=1)
    pipe = Pipeline(model)
    for steps in (4, 6):  # the warm-up and the last step of each video's own count
        assert _video_dense_calls(key, lambda steps=steps: pipe(steps)) == 2 * (math.ceil(0.5 * steps) + 1)


@pytest.mark.parametrize(
    ("timesteps", "steps"),
    [
        (torch.tensor([999.0, 800.0, 800.0, 500.0, 500.0, 0.0]), 4),  # a 2nd-order scheduler repeats timesteps
        ([999, 666, 333], 3),
        (torch.tensor([]), 0),
    ],
    ids=["repeats", "list", "empty"],
)
def test_steps_are_counted_as_the_step_clock_counts_them(timesteps, steps):
    assert _count_runs(timesteps) == steps


class RoundingPipeline(Pipeline):
    """As HunyuanVideo15Pipeline: the timestep reaches the model in the latents' bfloat16, where the early
    steps of a shift-9 schedule collide (997.7 and 995.4 are both 996)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=9.0)

    def __call__(self, num_inference_steps: int) -> None:
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        for t in timesteps:
            for _ in range(2):
                self.model(t.expand(1).to(torch.bfloat16))


def test_a_schedule_rounded_by_the_pipeline_keeps_its_step_counts():
    schedule = FlowMatchEulerDiscreteScheduler(shift=9.0)
    schedule.set_timesteps(50)
    assert _count_runs(schedule.timesteps.to(torch.bfloat16)) < 50  # the clock alone would count fewer steps
    reset()
    model, key = _model("step_count.rounded", dense_warmup=0.1, dense_last_steps=2)
    # 5 warm-up steps and the last 2, two calls each: as the schedule's own 50 steps count them
    assert _video_dense_calls(key, lambda: RoundingPipeline(model)(50)) == 2 * (5 + 2)


def test_step_clock_counts_falling_timesteps_and_restarts_on_a_rise():
    """The device clock against the rule in Python: a new video (step 0) on the first value or a rise, one step
    on each fall, none on a repeat (every site of a step ticks with the same value); float16 values too."""
    from rf_compile.ops.runtime.clock import StepClock

    values = [999.0, 999.0, 800.0, 800.0, 600.0, 999.0, 500.0, 500.0, 700.0, 1.0]
    for dtype in (torch.float32, torch.float16, torch.int64):
        clock, last, step, seen = StepClock(torch.device("cpu")), None, 0, []
        for value in values:
            step = 0 if last is None or value > last else step + (value != last)
            last = value
            seen.append(int(clock.tick(torch.tensor([value, value]).to(dtype))))
            assert seen[-1] == step, (dtype, value, seen)
        clock.reset()
        assert int(clock.tick(torch.tensor([1.0]))) == 0
