"""Where in the trajectory a fixed attention budget buys the most quality: oracle block masks per step.

The trained fidelity models sample from the same noise as their dense sample, with attention restricted on
every step to the oracle block mask (``oracle.py``: per query block the key blocks of most true mass) at
that step's density. Each schedule spends about the same whole-trajectory block density (dense steps count
1), so the rows compare only *where* it is spent: dense warm-up steps, a flat density, or a ramp from dense
to sparse (or the reverse). Masks know where the attention is, so what is measured is the schedule, not a
predictor. PSNR of the final sample against the dense sample, as in ``evaluate.py``.

    python benchmarks/fidelity/step_budget.py --out benchmarks/results/nvidia-h200/trained/step_budget  # GPU
    python benchmarks/fidelity/step_budget.py --batch 1 --schedules flat2 flat0 --out /tmp/sb  # CPU: ~5 min a row

Writes ``step_budget.json`` (records ``model, schedule, densities, whole_density, psnr_db``) and
``step_budget.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import models
import torch
from data import sample_batch
from evaluate import EVAL_SEED, oracle_hook
from metrics import psnr

from rf_compile import RainFusionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import environment, markdown_table  # noqa: E402


def ramp(first: float, last: float, dense_steps: int, steps: int) -> list[float]:
    """``dense_steps`` dense steps, then a linear density from ``first`` to ``last`` over the others."""
    m = steps - dense_steps
    return [1.0] * dense_steps + [first + (last - first) * i / max(m - 1, 1) for i in range(m)]


def schedules(steps: int, whole: float) -> dict[str, list[float]]:
    """Per-step densities of each schedule, every one averaging ``whole`` over the trajectory."""
    warm = RainFusionConfig(num_steps=steps).warmup_steps  # the backend's dense warm-up: the first 10%

    def after(dense_steps: int) -> float:  # the mean density left for the sparse steps
        return (whole * steps - dense_steps) / (steps - dense_steps)

    return {
        "flat2": ramp(after(warm), after(warm), warm, steps),  # today's rule: 10% dense, then flat
        "flat1": ramp(after(1), after(1), 1, steps),
        "flat0": ramp(whole, whole, 0, steps),  # no dense step: the budget spread evenly
        "ramp2_down": ramp(after(warm) + 0.2, after(warm) - 0.2, warm, steps),  # then from denser to sparser
        "ramp2_up": ramp(after(warm) - 0.2, after(warm) + 0.2, warm, steps),
        "ramp0_down": ramp(whole + 0.1, whole - 0.1, 0, steps),
        "ramp0_down_steep": ramp(whole + 0.2, whole - 0.2, 0, steps),
    }


def check_schedules(table: dict[str, list[float]], whole: float) -> None:
    """Refuse a schedule whose ramp leaves (0, 1] at this ``whole`` density (a low budget with a steep ramp)."""
    for name, densities in table.items():
        if not all(0.0 < d <= 1.0 for d in densities):
            span = f"{densities[0]:.3f} to {densities[-1]:.3f}"
            raise ValueError(f"schedule {name!r} at --whole {whole} needs per-step densities in (0, 1]; it would "
                             f"run from {span}: raise --whole or drop it")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    parser.add_argument("--models-dir", type=Path, default=here / "models")
    parser.add_argument("--models", nargs="+", default=list(models.NAMES))
    parser.add_argument("--steps", type=int, default=20, help="Euler steps of the sampling loop")
    parser.add_argument("--batch", type=int, default=4, help="clips per sample")
    parser.add_argument("--whole", type=float, default=0.4, help="whole-trajectory block density of every schedule")
    parser.add_argument("--block", type=int, default=128, help="block size of the oracle (the kernel's)")
    parser.add_argument("--frames", type=int, default=None, help="default: the model card's latent shape")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--schedules", nargs="+", default=None, help="names of the schedules (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    table = schedules(args.steps, args.whole)
    unknown = set(args.schedules or []) - set(table)
    if unknown:
        parser.error(f"unknown schedules {sorted(unknown)}; known: {list(table)}")
    table = {name: table[name] for name in (args.schedules or table)}
    try:
        check_schedules(table, args.whole)
    except ValueError as error:
        parser.error(str(error))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    state = {"step": 0}  # the sampling loop's step, read by the hook
    for name in args.models:
        model, card = models.load(args.models_dir / name, name, dtype=dtype, device=device)
        _, f, h, w = card["latent_shape"]
        size = dict(frames=args.frames or f, height=args.height or h, width=args.width or w)
        layout = models.layout_of(name, **size)
        clips, tokens = sample_batch(args.batch, EVAL_SEED, device=device, **size)
        text = models.conditions(tokens, card, dtype)
        noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(EVAL_SEED)).to(device, dtype)
        dense = models.sample(model, name, noise, text, args.steps)
        for label, densities in table.items():
            kept: list[float] = []  # block density of each masked call
            dense_calls = [0]

            def density_at(densities=densities, dense_calls=dense_calls) -> float | None:
                density = densities[state["step"]]
                if density >= 1.0:  # a dense step: plain SDPA
                    dense_calls[0] += 1
                    return None
                return density

            t0 = time.time()
            with models.CaptureAttention(oracle_hook(density_at, layout, args.block, kept)):
                out = models.sample(model, name, noise, text, args.steps, on_step=lambda i, t: state.update(step=i))
            whole = (sum(kept) + dense_calls[0]) / (len(kept) + dense_calls[0])
            records.append(dict(model=name, schedule=label, densities=[round(d, 4) for d in densities],
                                whole_density=whole, psnr_db=psnr(out, dense).mean().item(),
                                batch=args.batch, steps=args.steps))  # fmt: skip
            print(f"[{name}] {label:18s} whole density {records[-1]['whole_density']:.3f} "
                  f"PSNR {records[-1]['psnr_db']:.2f} dB ({time.time() - t0:.1f}s)", flush=True)  # fmt: skip
    env = environment()
    (args.out / "step_budget.json").write_text(json.dumps({"environment": env, "records": records}, indent=1))
    rows = [dict(r, first=r["densities"][0], last=r["densities"][-1]) for r in records]
    md = [f"# Oracle block masks, one budget spread over the steps\n\n`{env['command']}`\n",
          markdown_table(rows, ["model", "schedule", "first", "last", "whole_density", "psnr_db"])]  # fmt: skip
    (args.out / "step_budget.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
