"""Whether a site's sparse path pays at a call shape: a cost model, decided on the host once per shape.

For small sequences the per-call work around the sparse kernel (the ARM or v2's prediction, the
op's bookkeeping launches, its host time) costs more than the attention it saves: issue 23 measured
a 4-block Wan at 6,912 tokens 1.33x slower than inductor. So each call shape is priced before it runs:

    dense_ms  = 4 B H N^2 D / (dense TFLOP/s at head dim D)                  (cuDNN SDPA, measured)
    sparse_ms = call_ms (+ v2, and v1's predicted non-local heads: prediction per row)
                + dense_ms * density / efficiency

where ``density`` bounds the kept blocks from the plan alone, never from device data: v1 the worst
block density over the variants the ARM may pick (``PlanTable.density``; with ``textural="blocks"``
the predicted heads' budget among them), v2 its top-k budget plus the forced text, sink and diagonal
blocks. A shape stays dense unless sparse is expected at most
``SPARSE_BELOW`` of dense. The answer depends only on the shape, the config and the GPU, so it is
cached, makes no device read (CUDA graphs replay a call unchanged) and is the same at compile time
(static shapes: the pass leaves SDPA in place) and at run time (symbolic shapes: the op computes
dense SDPA and ``stats()`` lists the reason under ``dense_shapes``). Below ``sparse_floor`` (a symbolic
batch: ``sparse_work_floor``) no layout pays: there the pass keeps SDPA for symbolic shapes too, under a
guard (``passes.length_guard``).

It prices the Triton kernel only: the CPU reference path exists to check the plans, not to be fast,
and is never judged. Not here: which kernel can run a call (``ops.executors.choose_kernel``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from rf_compile.bounded import remember
from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.ops.v2 import keep_count, nonlocal_config, sink_frame_count
from rf_compile.plan import BLOCK_M, build_plan_table, variants_for

# Sparse only where it is expected to take at most this share of dense: the constants below carry
# the +-5% run-to-run noise of one machine (shared/anchors/README.md) and are fitted at large shapes,
# and near break-even dense also keeps the model's exact output.
SPARSE_BELOW = 0.9


@dataclasses.dataclass(frozen=True)
class DeviceCosts:
    """Measured constants of one GPU class (each field says which measurement chose it)."""

    name: str
    dense_tflops: tuple[tuple[int, float], ...]  # (head dim, cuDNN SDPA TFLOP/s), ascending head dims
    efficiency: float  # dense-equivalent time of the kept blocks / the sparse kernel's time
    v1_call_ms: float  # per v1 / v1+ call: ARM, bookkeeping launches, host time
    v2_call_ms: float  # per v2 call: prediction launches, bookkeeping, host time
    v2_ms_per_mrow: float  # v2 prediction per million (batch x head x token) rows at head dim 128
    nonlocal_call_ms: float  # per v1 call with predicted non-local heads: the ARM and the prediction's launches

    def tflops(self, head_dim: int) -> float:
        """Dense TFLOP/s at ``head_dim``: the measured value of the nearest head dim at or below it."""
        below = [t for d, t in self.dense_tflops if d <= head_dim]
        return below[-1] if below else self.dense_tflops[0][1]


HOPPER = DeviceCosts(
    name="H100/H200",
    # cuDNN SDPA, bf16, B=1 (benchmarks/results/nvidia-h200/attention_final.md): d=64 CogVideoX-5B 9.07 ms
    # = 428 TFLOP/s; d=128 Wan2.1-14B 38.4 ms = 573, HunyuanVideo 29.6 ms = 621. The H100 anchors agree
    # (420 / 573 / 627, shared/anchors/attn_anchors.md). The higher d=128 value: dense priced fast.
    dense_tflops=((64, 428.0), (128, 621.0)),
    # attention_final.md, best loop per shape: v1 mix and band plans 0.83-0.98 (HunyuanVideo at density
    # 0.3 lowest), v2 plans without their prediction 0.84-0.90. FP8 is priced as bf16 although its kernel
    # ran 1.0-1.25x faster there: it errs towards dense.
    efficiency=0.85,
    # Issue 23: a 4-block Wan (8 x 128 heads, 6,912 tokens, CFG batch 2) ran 8.8 ms a step against
    # inductor's 6.6 on an H100: 4 attention calls a step, 0.55 ms slower each. With dense 0.63 ms (FLOP
    # model) and v1's worst plan density there, 0.50, at 0.85 efficiency (0.37 ms), 0.81 ms is left for
    # what a v1 call adds: the ARM (0.13-0.15 ms of wall time alone, benchmarks/results/nvidia-h200/arm.md)
    # and the op's small launches and host time.
    v1_call_ms=0.80,
    # Not measured apart: v2 has no ARM but about as many launches (block means, selection, row copies,
    # bookkeeping), so v1's.
    v2_call_ms=0.80,
    # attention_final.md predict_gpu_ms: Wan2.1-14B 0.455 ms for 1.31 M rows (40 heads x 32,760),
    # HunyuanVideo 0.488 ms for 0.93 M rows; the larger per-row cost of the two.
    v2_ms_per_mrow=0.52,
    # v1's default (the ARM, then a predicted plan for every head), a 2-block Wan2.1-1.3B (12 x 128 heads, CFG
    # batch 2) with the cost model off on an H100 (nvidia-h100-80gb-hbm3/crossover_v1_blocks_sparse.md): 0.62x
    # inductor at 6,912 tokens, 1.10x at 14,040. With its kept blocks at v1's worst density (0.5) and the
    # prediction per row, any per-call cost from 0.21 to 1.04 ms decides both lengths right; the ARM's 0.80
    # plus v2's 0.80 (1.6) kept 14,040 dense. Near the upper end, erring towards dense.
    nonlocal_call_ms=0.90,
)
# Checked against whole models (benchmarks/results/nvidia-h200/e2e_full*.md, time saved a call = (inductor -
# sparse step) / blocks): Wan2.1-1.3B v1 / v2 10.7 / 15.4 ms measured, 8.3 / 13.1 estimated; CogVideoX-5B
# 8.4 / 11.3 measured, 6.7 / 9.6 estimated; HunyuanVideo v1 218 measured, 115 estimated (its masked dense
# attention runs below 621 TFLOP/s). The model errs towards dense at large shapes as well.

# GPUs by a part of their name. Another GPU gets Hopper's constants: a slower GPU has slower dense
# attention than they say, so the model errs towards dense there.
DEVICES: dict[str, DeviceCosts] = {"H100": HOPPER, "H200": HOPPER}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The priced call shape: what dense and sparse are expected to take."""

    tokens: int
    dense_ms: float
    sparse_ms: float
    density: float  # the kept-block bound used
    device: str

    @property
    def ratio(self) -> float:
        return self.sparse_ms / self.dense_ms

    @property
    def sparse_pays(self) -> bool:
        return self.ratio <= SPARSE_BELOW

    def describe(self) -> str:
        """Why the shape runs as it does, for ``stats()`` and the compile report."""
        if self.sparse_pays:
            return f"sparse at {self.tokens:,} tokens (est. {self.ratio:.2f}x dense on {self.device})"
        verdict = "be slower" if self.ratio >= 1 else f"save under {1 - SPARSE_BELOW:.0%}"
        return f"sparse would {verdict} at {self.tokens:,} tokens (est. {self.ratio:.2f}x dense on {self.device})"


def costs_for(device: torch.device, kernel: str) -> DeviceCosts | None:
    """The constants that price calls on ``device`` with ``kernel``; None where the model does not apply
    (the reference kernel)."""
    if kernel != "triton" or device.type != "cuda":
        return None
    return _costs_of(torch.cuda.get_device_name(device.index if device.index is not None else None))


@functools.lru_cache(maxsize=16)
def _costs_of(gpu: str) -> DeviceCosts:
    found = next((costs for part, costs in DEVICES.items() if part in gpu), None)
    return found or dataclasses.replace(HOPPER, name=f"{gpu}, priced as an H100")


def estimate(
    config: RainFusionConfig, layout: VideoLayout, batch: int, heads: int, head_dim: int, costs: DeviceCosts
) -> Estimate:
    """Dense and sparse time of one call of ``batch`` x ``heads`` heads of ``head_dim`` over ``layout``."""
    N = layout.seq_len
    dense_ms, fixed = _dense_and_fixed_ms(config, batch, heads, N, head_dim, costs)
    if config.mode == "v2":
        density = v2_density_bound(layout, config)
    else:
        density = v1_density_bound(layout, config)
        if config.predicts_nonlocal:
            density = max(density, v2_density_bound(layout, nonlocal_config(config)))
    sparse_ms = fixed + dense_ms * density / costs.efficiency
    return Estimate(N, dense_ms, sparse_ms, density, costs.name)


def _judged(config: RainFusionConfig) -> bool:
    """Whether the cost model decides for ``config``: not when it is off, in dense mode, when calibration
    measures (it is not timed), or with a profile (its densities were chosen by measurement)."""
    return config.cost_model and config.mode not in ("dense", "calibrate") and config.profile is None


def _judging_costs(config: RainFusionConfig, device: torch.device, kernel: str) -> DeviceCosts | None:
    """The constants that price ``config``'s calls on ``device``; None where the model does not judge."""
    return costs_for(device, kernel) if _judged(config) else None


def _dense_and_fixed_ms(
    config: RainFusionConfig, batch: int, heads: int, tokens: int, head_dim: int, costs: DeviceCosts
) -> tuple[float, float]:
    """Dense SDPA's time of a call, and what a sparse call costs before its kept blocks (prediction, launches):
    v2's prediction, v1's ARM, or where v1 predicts its non-local heads the ARM and a prediction of every head."""
    dense_ms = 4 * batch * heads * tokens * tokens * head_dim / (costs.tflops(head_dim) * 1e12) * 1e3
    per_row = costs.v2_ms_per_mrow * batch * heads * tokens / 1e6 * head_dim / 128
    if config.mode == "v2":
        return dense_ms, costs.v2_call_ms + per_row
    if config.predicts_nonlocal:
        return dense_ms, costs.nonlocal_call_ms + per_row
    return dense_ms, costs.v1_call_ms


def shape_dense_reason(config: RainFusionConfig, q: torch.Tensor, kernel: str) -> str | None:
    """Why a call of ``q``'s static shape stays dense at any layout: it is shorter than ``sparse_floor``. For
    sites whose layout comes only at the call (regional graphs: from the calling model), so the pass can leave
    their SDPA in place at small shapes instead of running the op there to decide dense (host time a short
    step shows)."""
    B, H, N, D = (int(size) for size in q.shape)
    floor = sparse_floor(config, B, H, D, q.device, kernel)
    if floor is None or N >= floor[0]:
        return None
    costs = costs_for(q.device, kernel)
    dense_ms, fixed = _dense_and_fixed_ms(config, B, H, N, D, costs)
    return (f"sparse would be slower at {N:,} tokens whatever the layout (est. its per-call cost alone "
            f"{fixed / dense_ms:.2f}x dense on {costs.name})")  # fmt: skip


def sparse_floor(
    config: RainFusionConfig, batch: int, heads: int, head_dim: int, device: torch.device, kernel: str
) -> tuple[int, str] | None:
    """The fewest tokens at which a call of ``batch`` x ``heads`` heads of ``head_dim`` could pay sparse at some
    layout, and why shorter ones cannot; None where the model does not judge. Below it, what a sparse call costs
    before its kept blocks (``_dense_and_fixed_ms``) is already more than ``SPARSE_BELOW`` of dense. The pass
    guards symbolic lengths on it (``passes.length_guard``)."""
    costs = _judging_costs(config, device, kernel)
    if costs is None:
        return None
    tokens = _fewest_paying_tokens(config, batch, heads, head_dim, costs)
    return tokens, f"sparse would be slower below {tokens:,} tokens whatever the layout (est. on {costs.name})"


@functools.lru_cache(maxsize=64)
def _fewest_paying_tokens(config: RainFusionConfig, batch: int, heads: int, head_dim: int, costs: DeviceCosts) -> int:
    """Bisection: the fixed cost grows linearly with the tokens and dense quadratically, so once the fixed
    cost is within ``SPARSE_BELOW`` of dense it stays so."""

    def pays(tokens: int) -> bool:
        dense_ms, fixed = _dense_and_fixed_ms(config, batch, heads, tokens, head_dim, costs)
        return fixed <= SPARSE_BELOW * dense_ms

    low, high = 0, 1  # pays(high), not pays(low)
    while not pays(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if pays(middle) else (middle, high)
    return high


def sparse_work_floor(
    config: RainFusionConfig, heads: int, head_dim: int, device: torch.device, kernel: str
) -> tuple[int, str] | None:
    """For a symbolic batch: the least batch x tokens^2 at which a call of ``heads`` heads of ``head_dim`` could pay
    sparse at some layout, whatever its batch, and why smaller ones cannot; None where the model does not judge.
    Dense grows as batch x tokens^2, and a sparse call costs at least the part of ``_dense_and_fixed_ms``'s fixed
    cost that no row adds (the ARM, the launches, the host), so below this product sparse is never within
    ``SPARSE_BELOW`` of dense: the floor itself for v1's paper form, short of it where a prediction's per-row cost
    adds (a guard on it keeps SDPA only where sparse cannot pay)."""
    costs = _judging_costs(config, device, kernel)
    if costs is None:
        return None
    work = _least_paying_work(config, heads, head_dim, costs)
    return work, f"sparse would be slower below batch x tokens^2 = {work:,} whatever the layout (est. on {costs.name})"


@functools.lru_cache(maxsize=64)
def _least_paying_work(config: RainFusionConfig, heads: int, head_dim: int, costs: DeviceCosts) -> int:
    unit_ms, _ = _dense_and_fixed_ms(config, 1, heads, 1, head_dim, costs)  # dense per unit of batch x tokens^2
    _, call_ms = _dense_and_fixed_ms(config, 1, heads, 0, head_dim, costs)  # the fixed cost that no row adds
    return math.ceil(call_ms / (SPARSE_BELOW * unit_ms))


@functools.lru_cache(maxsize=64)
def v1_density_bound(layout: VideoLayout, config: RainFusionConfig) -> float:
    """The largest block density of the variants the ARM can choose (v1, v1+), from the plans on the host."""
    return max(build_plan_table(layout, variants_for(config), "cpu").density().tolist())


def v2_density_bound(layout: VideoLayout, config: RainFusionConfig, block: int = BLOCK_M) -> float:
    """Most blocks a v2 plan keeps, as a fraction: forced rows (text, sink frames) keep every block, the
    others their top-k budget, inside which the forced columns and the diagonal count (``ops.v2``), or
    those alone where they are more. Under a ``sparsity_ramp`` the budget of its mean sparsity: the shape is
    judged over a video, whose early sparse steps keep more blocks and late ones fewer."""
    M = -(-layout.seq_len // block)
    head = layout.prefix + sink_frame_count(layout, config) * layout.frame_tokens  # tokens at the start, forced
    forced = -(-head // block) + (M - (layout.prefix + layout.video_tokens) // block if layout.suffix else 0)
    forced = min(M, forced)
    per_row = min(M, max(keep_count(M, config), forced + 1))
    return (forced * M + (M - forced) * per_row) / (M * M)


_VERDICTS: dict[tuple, str | None] = {}
MAX_VERDICTS = 256  # call shapes remembered (a site remembers 32 layouts, SiteSpec.MAX_LAYOUTS)


def dense_reason(config: RainFusionConfig, layout: VideoLayout, q: torch.Tensor, kernel: str) -> str | None:
    """Why a call of ``q``'s shape should stay dense SDPA ("sparse would be slower at ..."), or None.

    Host-side and cached per (config, layout, shape, device, kernel): the first call of a shape prices
    it, later calls look it up. ``q`` may be a fake tensor (the compile-time pass).
    """
    if not _judged(config):
        return None
    B, H, _, D = q.shape
    key = (config, layout, int(B), int(H), int(D), q.device, kernel)
    if key not in _VERDICTS:
        costs = costs_for(q.device, kernel)
        found = estimate(config, layout, int(B), int(H), int(D), costs) if costs is not None else None
        remember(_VERDICTS, key, None if found is None or found.sparse_pays else found.describe(), MAX_VERDICTS)
    return _VERDICTS[key]
