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
        self._thresholds: dict[tuple[torch.device, float], torch.Tensor] = {}
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

    def warmup(self, config: RainFusionConfig, device: torch.device) -> int | torch.Tensor:
        """Dense steps of each video under ``config``: from option ``num_steps`` if given, else an int64
        device tensor that follows the pipeline (the step is compared with it on the device)."""
        if config.num_steps is not None:
            return config.warmup_steps
        return self._on_device(device, float(config.dense_warmup))

    def num_steps(self, config: RainFusionConfig, device: torch.device) -> int | torch.Tensor:
        """Steps of each video under ``config`` (``dense_last_steps`` counts back from it), as ``warmup``."""
        if config.num_steps is not None:
            return config.num_steps
        return self._on_device(device, 1.0)  # ceil(1.0 * count): the count itself

    def _on_device(self, device: torch.device, share: float) -> torch.Tensor:
        """``ceil(share * count)`` in a persistent int64 scalar on ``device``, rewritten for each video."""
        key = (device, share)
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

    def _threshold(self, device: torch.device, share: float) -> int | torch.Tensor:
        """``ceil(share * count)``: a host int, or (count on the device) a float64 product rounded up there,
        so both round as ``config.warmup_steps`` does."""
        if isinstance(self._count, int):
            return math.ceil(share * self._count)
        return torch.ceil(self._count.to(device).double() * share).long()


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
    runs = (t[1:] != t[:-1]).sum() + 1
    return int(runs) if t.device.type == "cpu" else runs  # on an accelerator it stays there: no sync
