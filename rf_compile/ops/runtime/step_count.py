"""How many denoising steps the current video has: the calling pipeline's own, an option's, or 50.

The dense warm-up keeps the first ``ceil(dense_warmup * num_steps)`` steps of each video dense.
``options={"num_steps": N}`` fixes N at compile time. Without it, the diffusers pipeline that calls
the model (found on the Python call stack: a method of an object with a ``scheduler`` whose frame
holds the loop's ``timesteps``) gives N, once per video: a forward pre-hook on the model looks for it
on the host at every call and works only when the pipeline's ``timesteps`` object is new. N is the
number of runs of equal consecutive timesteps, which is what the step clock counts (a second-order
scheduler that repeats a timestep takes one step for both calls), and is computed where the
timesteps live, so a pipeline on the GPU never makes the host wait. Each warm-up threshold is a
device tensor made outside CUDA-graph pools and updated in place, so a captured graph reads the
current video's threshold at every replay. With no pipeline on the stack N is 50 again.

The clock counts the values the model receives, and a pipeline may round them first: HunyuanVideo 1.5's
casts ``t`` to the latents' bfloat16, where 997.7 and 995.4 are both 996 (its 50-step 720p schedule has 46
distinct values). So a threshold at step k of the pipeline's schedule is the clock's count at that step
of the schedule rounded to the clock's dtype: the warm-up is k steps, and ``dense_last_steps`` the last
steps, whatever the rounding merged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from rf_compile.config import DEFAULT_NUM_STEPS, RainFusionConfig
from rf_compile.ops.runtime.call_stack import calling_pipeline
from rf_compile.persistent import persistent


class StepCount:
    """Steps of one model instance's current video, and its dense warm-up thresholds (per device)."""

    def __init__(self) -> None:
        self.pipeline = ""  # class name of the pipeline the count came from ("": the default)
        self._count: int | torch.Tensor = DEFAULT_NUM_STEPS  # a device tensor when counted there
        self._timesteps: object = None  # the pipeline's timesteps the count was taken from
        self._thresholds: dict[tuple, torch.Tensor] = {}  # (device, share, steps back, clock dtype)
        self._buffers: dict[torch.device, torch.Tensor] = {}  # where a count made on a device is kept

    def watch(self, module: torch.nn.Module) -> None:
        """Follow the pipelines that call ``module``: in this call, and by a pre-hook in every later one."""
        # Dynamo must not trace the hook (it runs under torch.compile's callback): host work, every call.
        module.register_forward_pre_hook(torch.compiler.disable(lambda _module, _args: self.follow_pipeline()))
        self.follow_pipeline()

    def follow_pipeline(self) -> None:
        """Take the calling pipeline's count when its ``timesteps`` are new (host work, no device sync)."""
        found = calling_pipeline()
        if found is None:
            if self.pipeline:  # called outside a pipeline now: back to the default
                self.pipeline, self._timesteps = "", None
                self._set(DEFAULT_NUM_STEPS)
            return
        pipeline, timesteps = found
        if timesteps is not self._timesteps:
            self.pipeline, self._timesteps = type(pipeline).__name__, timesteps
            self._set(_count_runs(timesteps))

    def warmup(self, config: RainFusionConfig, device: torch.device, dtype: torch.dtype | None = None):
        """The clock's count where the dense warm-up ends, for a clock of ``dtype`` values: from option
        ``num_steps`` a host int, else an int64 device tensor that follows the pipeline (compared there)."""
        if config.num_steps is not None:
            return config.warmup_steps
        return self._on_device(device, float(config.dense_warmup), 0, dtype)

    def last_steps_start(self, config: RainFusionConfig, device: torch.device, dtype: torch.dtype | None = None):
        """The clock's count where the last ``dense_last_steps`` steps begin, as ``warmup``."""
        if config.num_steps is not None:
            return config.num_steps - config.dense_last_steps
        return self._on_device(device, 1.0, config.dense_last_steps, dtype)

    def _on_device(self, device: torch.device, share: float, back: int, dtype: torch.dtype | None) -> torch.Tensor:
        """The clock's count at step ``ceil(share * count) - back`` in a persistent int64 scalar on ``device``,
        rewritten for each video."""
        key = (device, share, back, dtype)
        threshold = self._thresholds.get(key)
        if threshold is None:
            threshold = self._thresholds[key] = _persistent_scalar(device)
            _fill(threshold, self._threshold(*key))  # on this stream: after the count it reads
        return threshold

    def describe(self, config: RainFusionConfig) -> dict:
        """``num_steps``, ``warmup_steps`` and where the count came from, for ``stats()`` (may sync)."""
        if config.num_steps is not None:
            steps, source = config.num_steps, "option num_steps"
        else:
            steps = int(self._count)
            source = f"pipeline {self.pipeline} timesteps" if self.pipeline else "default"
        warmup = dataclasses.replace(config, num_steps=steps).warmup_steps
        return {"num_steps": steps, "warmup_steps": warmup, "num_steps_from": f"{source}: {steps} steps"}

    def _set(self, count: int | torch.Tensor) -> None:
        if isinstance(count, torch.Tensor):  # kept outside CUDA-graph pools (the first count is taken in a call)
            buffer = self._buffers.get(count.device)
            if buffer is None:
                buffer = self._buffers[count.device] = _persistent_scalar(count.device)
            count = buffer.copy_(count)
        self._count = count
        for key, threshold in self._thresholds.items():
            _fill(threshold, self._threshold(*key))

    def _threshold(self, device: torch.device, share: float, back: int, dtype: torch.dtype | None):
        """Step ``ceil(share * count) - back`` (a float64 product rounded up, as ``config.warmup_steps`` rounds),
        as the clock counts it: through the pipeline's timesteps rounded to ``dtype``, where there are any."""
        if isinstance(self._count, int):
            step = math.ceil(share * self._count) - back
        else:
            step = torch.ceil(self._count.to(device).double() * share).long() - back
        if self._timesteps is None or dtype is None:
            return step
        count = _clock_count_at(self._timesteps, step, dtype)
        return count if isinstance(count, int) else count.to(device)


def _persistent_scalar(device: torch.device) -> torch.Tensor:
    return persistent(lambda: torch.zeros((), dtype=torch.int64, device=device), device)


def _fill(tensor: torch.Tensor, value: int | torch.Tensor) -> torch.Tensor:
    """Write ``value`` into ``tensor`` in place without a host sync (a scalar fill or a device copy)."""
    return tensor.fill_(value) if isinstance(value, int) else tensor.copy_(value)


def _count_runs(timesteps: Sequence | torch.Tensor) -> int | torch.Tensor:
    """Steps of a schedule as the step clock counts them: runs of equal consecutive timesteps."""
    if not isinstance(timesteps, torch.Tensor):
        values = [float(t) for t in timesteps]
        return sum(1 for i, t in enumerate(values) if i == 0 or t != values[i - 1])
    t = timesteps.reshape(-1)
    if t.numel() == 0:
        return 0
    runs = clock_counts(t)[-1] + 1
    return int(runs) if t.device.type == "cpu" else runs  # on an accelerator it stays there: no sync


def clock_counts(t: torch.Tensor) -> torch.Tensor:
    """Per position of a schedule (1-D), the clock's count there: the runs of equal values before it."""
    return torch.cat([t.new_zeros(1, dtype=torch.long), (t[1:] != t[:-1]).long().cumsum(0)])


def _clock_count_at(timesteps: Sequence | torch.Tensor, step: int | torch.Tensor, dtype: torch.dtype):
    """The clock's count at pipeline step ``step`` when the model receives the timesteps in ``dtype``
    (past the last step: the clock's last count + 1). Stays where the timesteps live: no host sync."""
    t = timesteps.reshape(-1) if isinstance(timesteps, torch.Tensor) else torch.tensor([float(v) for v in timesteps])
    if t.numel() == 0:
        return step
    steps, counts = clock_counts(t), clock_counts(t.to(dtype))
    reached = steps >= (step.to(t.device) if isinstance(step, torch.Tensor) else step)
    at = counts.gather(0, reached.long().argmax().reshape(1))[0]  # a device index: no host read
    count = torch.where(reached.any(), at, counts[-1] + 1)
    return int(count) if t.device.type == "cpu" else count
