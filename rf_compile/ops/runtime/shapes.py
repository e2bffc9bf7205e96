"""Device state of one site for one (layout, batch size), and the device-side decisions of one call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from rf_compile.layout import VideoLayout
from rf_compile.persistent import persistent
from rf_compile.plan import Pattern, Variant

DENSE = Variant(Pattern.DENSE)


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
    block_density_sums: torch.Tensor  # float64 [H]: sum over sparse calls of the kept block fraction per head
    error_sums: torch.Tensor  # float64 [H, 2]: sum and count of measured relative errors (``measure_error``)
    candidate_errors: torch.Tensor  # float64 [H, C]: mode="calibrate": summed error of each candidate density
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
        candidates: int = 0,
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
                error_sums=zeros((heads, 2), torch.float64),
                candidate_errors=zeros((heads, candidates), torch.float64),
                sparse_heads=zeros((), torch.float64),
                prepared=prepare() if prepare is not None else None,
            )

        return persistent(make, device)

    def reset(self) -> None:
        for tensor in (self.calls, self.dense_calls, self.arm_runs, self.variant, self.variant_counts, self.recall_sums,
                       self.kept, self.block_density_sums, self.error_sums, self.candidate_errors,
                       self.sparse_heads):  # fmt: skip
            tensor.zero_()
        self.recall.fill_(float("nan"))


@dataclasses.dataclass
class CallPlan:
    """The device-side decisions of one call."""

    shape: ShapeState
    dense: torch.Tensor  # bool scalar: a dense call (warm-up, last steps or a dense layer)
    run_arm: torch.Tensor  # bool scalar: the ARM decides anew in this call
    progress: torch.Tensor | None = None  # float64 scalar in [0, 1]: where this step lies in the sparse steps
