"""Per-site run-time state of the op: dense warm-up, ARM decisions and statistics.

Sites are registered by the rewrite pass (one entry per rewritten SDPA call) and looked up by
the op through the ``site`` string argument. Nothing here makes the host wait for the device,
except reading a new ``timestep`` value once per denoising step.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable

import torch

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.plan import Pattern, Variant, variants_for


@dataclasses.dataclass
class SiteState:
    """Everything the op remembers about one attention site between calls."""

    name: str
    layout: VideoLayout
    config: RainFusionConfig
    variants: tuple[Variant, ...]
    calls: int = 0
    dense_calls: int = 0
    arm_runs: int = 0
    cached_decision: tuple[torch.Tensor, torch.Tensor] | None = None  # (variants, recall) [B, H]
    variant_counts: torch.Tensor | None = None  # int64 [H, P] on the device
    recall_sums: torch.Tensor | None = None  # float64 [H, 2] on the device: sum and count of estimated recalls
    kept_pairs: torch.Tensor | None = None  # float64 scalar on the device: sum of kept fractions
    block_density_sums: torch.Tensor | None = None  # v2: float64 [H] on the device
    sparse_heads: int = 0

    def is_dense_call(self, timestep: torch.Tensor | None) -> bool:
        """Dense warm-up: keyed to the timestep when the graph has one, else to a call counter."""
        config = self.config
        if config.mode == "dense":
            return True
        if config.dense_warmup == 0:
            return False
        if timestep is not None:
            return current_timestep(timestep) >= (1.0 - config.dense_warmup) * 1000.0
        return self.calls < math.ceil(config.dense_warmup * config.num_steps)

    def decision_for_call(
        self, batch_heads: torch.Size, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the ARM (``compute()``) or reuse its last decision, per ``arm_every``.

        A decision made for another batch size is never reused.
        """
        sparse_call = self.calls - self.dense_calls
        cached = self.cached_decision
        if cached is None or cached[0].shape != batch_heads or sparse_call % self.config.arm_every == 0:
            self.cached_decision = cached = compute()
            self.arm_runs += 1
        return cached

    def record(self, variant_of_head: torch.Tensor, recall: torch.Tensor, density: torch.Tensor) -> None:
        """Accumulate pattern counts, estimated recalls and the kept fraction per head, on the device."""
        B, H = variant_of_head.shape
        P, device = len(self.variants), variant_of_head.device
        if self.variant_counts is None or self.variant_counts.shape != (H, P):
            self.variant_counts = torch.zeros(H, P, dtype=torch.int64, device=device)
            self.recall_sums = torch.zeros(H, 2, dtype=torch.float64, device=device)
            self.kept_pairs = torch.zeros((), dtype=torch.float64, device=device)
        # Counts per (head, variant) without one_hot, whose range check would sync with the device.
        cells = (torch.arange(H, device=device) * P + variant_of_head).flatten()
        self.variant_counts.view(-1).index_add_(0, cells, torch.ones_like(cells))
        known = ~recall.isnan()
        self.recall_sums[:, 0] += torch.where(known, recall, 0).double().sum(0)
        self.recall_sums[:, 1] += known.double().sum(0)
        self.kept_pairs += density[variant_of_head].double().sum()
        self.sparse_heads += variant_of_head.numel()

    def record_blocks(self, density: torch.Tensor) -> None:
        """v2: accumulate the fraction of key blocks each (batch element, head) computed, [B, H]."""
        if self.block_density_sums is None or self.block_density_sums.shape[0] != density.shape[1]:
            self.block_density_sums = torch.zeros(density.shape[1], dtype=torch.float64, device=density.device)
            self.kept_pairs = torch.zeros((), dtype=torch.float64, device=density.device)
        self.block_density_sums += density.double().sum(0)
        self.kept_pairs += density.double().sum()
        self.sparse_heads += density.numel()

    def summary(self) -> dict:
        """Host-side statistics (reads the device counters)."""
        heads = []
        if self.variant_counts is not None:
            counts = self.variant_counts.cpu()
            recall_sum, recall_count = self.recall_sums.cpu().unbind(-1)
            for h, row in enumerate(counts.tolist()):
                per_pattern = {p.name.lower(): 0 for p in Pattern}
                bandwidths = []
                for variant, n in zip(self.variants, row):
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
        if self.block_density_sums is not None:
            calls = self.sparse_heads / len(self.block_density_sums)
            heads = [{"block_density": d / calls} for d in self.block_density_sums.cpu().tolist()]
        density = float(self.kept_pairs) / self.sparse_heads if self.sparse_heads else None
        return {
            "layout": self.layout.describe(),
            "calls": self.calls,
            "dense_calls": self.dense_calls,
            "sparse_calls": self.calls - self.dense_calls,
            "arm_runs": self.arm_runs,
            "density": density,
            "sparsity": None if density is None else 1.0 - density,
            "heads": heads,
        }


_SITES: dict[str, SiteState] = {}
_LOCK = threading.Lock()
_timestep_cache: tuple[torch.Tensor, int, float] | None = None


def register_site(name: str, layout: VideoLayout, config: RainFusionConfig) -> str:
    """Register a rewritten site; returns the key the op is called with."""
    with _LOCK:
        key = name
        suffix = 1
        while key in _SITES and (_SITES[key].layout, _SITES[key].config) != (layout, config):
            suffix += 1
            key = f"{name}#{suffix}"
        if key not in _SITES:
            _SITES[key] = SiteState(name=key, layout=layout, config=config, variants=variants_for(config))
        return key


def get_site(key: str) -> SiteState:
    try:
        return _SITES[key]
    except KeyError:
        raise RuntimeError(
            f"rainfusion site {key!r} is not registered in this process; recompile the model "
            "with backend='rainfusion'"
        ) from None


def current_timestep(timestep: torch.Tensor) -> float:
    """Value of the model's timestep input, read once per new tensor (one sync per step)."""
    global _timestep_cache
    cache = _timestep_cache
    if cache is not None and cache[0] is timestep and cache[1] == timestep._version:
        return cache[2]
    value = float(timestep.reshape(-1)[0])
    _timestep_cache = (timestep, timestep._version, value)
    return value


def stats() -> dict[str, dict]:
    """Per site: calls, dense/sparse calls, ARM runs, measured sparsity and per-head pattern counts."""
    return {key: state.summary() for key, state in _SITES.items()}


def reset() -> None:
    """Forget calls, statistics and cached decisions (sites stay registered)."""
    global _timestep_cache
    _timestep_cache = None
    for key, state in _SITES.items():
        _SITES[key] = SiteState(name=state.name, layout=state.layout, config=state.config, variants=state.variants)
