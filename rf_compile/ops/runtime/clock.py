"""The step clock: the denoising step of the current video, counted on the device (no host sync)."""

from __future__ import annotations

import torch

from rf_compile.persistent import persistent


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
        self.dtype: torch.dtype | None = None  # of the timesteps it counts (host metadata, set when a call ticks it)

    def tick(self, timestep: torch.Tensor) -> torch.Tensor:
        """Advance on a new timestep value (restart on a larger one); returns the step (int64 scalar)."""
        self.dtype = timestep.dtype
        t = timestep.reshape(-1)[0].to(device=self.last.device, dtype=torch.float64)
        # A step on while the value falls or stays; a new video (0) where it rises or the clock is fresh: NaN
        # compares false, so ``t <= last`` covers both. Seven small device ops a call (eleven before): every call of
        # every site ticks.
        self.step.copy_(torch.where(t <= self.last, self.step + (t != self.last), 0))
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


def reset_clocks() -> None:
    """Restart every device's clock (in place: captured CUDA graphs keep pointing at it)."""
    for clock in _CLOCKS.values():
        clock.reset()
