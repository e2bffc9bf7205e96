"""Sparse vs dense quality of the trained fidelity models, through the real backend.

For each model and each mode (a set of ``torch.compile(..., backend="rainfusion", options=...)``
options): the full Euler sampling loop from the same noise and condition as the dense (eager)
sample, with the backend's dense warm-up; PSNR and SSIM of the final samples against the dense
sample; the held-out flow-matching loss against dense (relative increase); the cosine similarity
of each layer's attention output against dense (``rf_compile.sparse_attention`` on the q/k/v of
the dense trajectory at t = 0.5); the achieved attention sparsity from ``rf_compile.stats()``;
and, for v1/v1+, the ARM's agreement with an oracle that sees the full attention map
(``oracle.py``), for every (layer, head, sparse step) of the dense trajectory, honouring
``arm_every`` (a reused decision is compared with the oracle of the step it is used in).
Two reference rows bound the scale: ``dense other-noise`` (PSNR between dense samples of two
noise seeds) and ``random-mask`` (attention restricted to a random mask at v1's density).

    python benchmarks/fidelity/evaluate.py --out benchmarks/results/nvidia-h200/trained   # GPU, < 4 min
    python benchmarks/fidelity/evaluate.py --sweep alpha=0.8,0.9,0.95 --sweep bandwidth=0.18,0.25 \\
        --sweep-modes v1 --out /tmp/sweep                                                   # tune defaults
    python benchmarks/fidelity/evaluate.py --tiny --models-dir /tmp/fidelity --out /tmp/eval  # CPU smoke

Writes ``fidelity.json`` (one record per model and setting: ``mode`` is ``v1``, ``v1+``, ``v2``,
``dense`` or ``random-mask``, ``setting`` the row's label such as ``v2 s=0.8 warmup=0``, ``options``
its options), ``fidelity.md``, ``pareto.png`` (PSNR vs achieved attention sparsity) and
``strip_<model>.png`` (dense vs sparse frames) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import models
import oracle
import torch
import torch.nn.functional as F
from data import describe, sample_batch
from metrics import psnr, ssim
from train import HELDOUT_SEED, frame_strip

import rf_compile
from rf_compile import RainFusionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import environment, gpu_slug, markdown_table  # noqa: E402

EVAL_SEED = 2 * 10**9
# v1 with predicted non-local heads as the fourth session ran it: the checkerboard's share and threshold, flat.
V1_BLOCKS_THEN = {"mode": "v1", "textural": "blocks", "alpha": 0.8, "textural_density": 0.5, "sparsity_ramp": 0}
# Priority order: when the time budget runs out, the rest is skipped (and listed as skipped).
DEFAULT_MODES = {
    "v1": {"mode": "v1"},
    "v1 paper": {"mode": "v1", "textural": "checkerboard"},  # the default until 2026-12-07
    # The fourth session's rows, pinned to what they ran then (the defaults of v1 have moved since).
    "v1 textural=blocks": {**V1_BLOCKS_THEN, "order": "tiles"},
    "v2 s=0.8": {"mode": "v2", "sparsity": 0.8},
    "v2 s=0.8 tokens": {"mode": "v2", "sparsity": 0.8, "order": "tokens"},
    "v2 s=0.7 tokens": {"mode": "v2", "sparsity": 0.7, "order": "tokens"},
    "v2 s=0.6 tokens": {"mode": "v2", "sparsity": 0.6, "order": "tokens"},
    "v2 s=0.5 tokens": {"mode": "v2", "sparsity": 0.5, "order": "tokens"},
    "v1 textural=blocks tokens": {**V1_BLOCKS_THEN, "order": "tokens"},
    "v1+": {"mode": "v1+"},
    "v2 s=0.8 tokens sink=0": {"mode": "v2", "sparsity": 0.8, "order": "tokens", "sink_frames": 0},
    "v2 s=0.8 sink=0": {"mode": "v2", "sparsity": 0.8, "sink_frames": 0},
    "v2 s=0.7 tokens sink=0": {"mode": "v2", "sparsity": 0.7, "order": "tokens", "sink_frames": 0},
    "v2 s=0.6 tokens sink=0": {"mode": "v2", "sparsity": 0.6, "order": "tokens", "sink_frames": 0},
    "v2 s=0.8 tokens budget=heads": {"mode": "v2", "sparsity": 0.8, "order": "tokens", "budget": "heads"},
    "v2 s=0.8 tokens budget=call": {"mode": "v2", "sparsity": 0.8, "order": "tokens", "budget": "call"},
    "v2 s=0.7 tokens budget=heads": {"mode": "v2", "sparsity": 0.7, "order": "tokens", "budget": "heads"},
    "v2 s=0.7 tokens budget=call": {"mode": "v2", "sparsity": 0.7, "order": "tokens", "budget": "call"},
    "v2 s=0.8 budget=call": {"mode": "v2", "sparsity": 0.8, "budget": "call"},
    "v2 s=0.7 tokens dense_layers=1": {"mode": "v2", "sparsity": 0.7, "order": "tokens", "dense_layers": 1},
    "v1 dense_layers=1": {"mode": "v1", "dense_layers": 1},
    "v1 dense_last_steps=2": {"mode": "v1", "dense_last_steps": 2},
    "v1 warmup=0": {"mode": "v1", "dense_warmup": 0.0},
    "v2 s=0.7": {"mode": "v2", "sparsity": 0.7},
    "v2 s=0.9": {"mode": "v2", "sparsity": 0.9},
    "v1 arm_every=2": {"mode": "v1", "arm_every": 2},
    "v1 arm_every=4": {"mode": "v1", "arm_every": 4},
    "v1+ warmup=0": {"mode": "v1+", "dense_warmup": 0.0},
    "v2 s=0.8 warmup=0": {"mode": "v2", "sparsity": 0.8, "dense_warmup": 0.0},
    "v1+ arm_every=2": {"mode": "v1+", "arm_every": 2},
    "v1+ arm_every=4": {"mode": "v1+", "arm_every": 4},
    "v2 s=0.7 warmup=0": {"mode": "v2", "sparsity": 0.7, "dense_warmup": 0.0},
    "v2 s=0.9 warmup=0": {"mode": "v2", "sparsity": 0.9, "dense_warmup": 0.0},
}


def parse_sweep(items: list[str], modes: list[str]) -> dict[str, dict]:
    """Grid of options from ``KEY=V1,V2`` items (``;`` separates values that contain commas) per base mode."""
    grid: list[dict] = [{}]
    for item in items:
        key, _, values = item.partition("=")
        parts = values.split(";") if ";" in values else values.split(",")
        parsed = []
        for part in parts:
            try:
                value = json.loads(part)
            except json.JSONDecodeError:
                value = part
            parsed.append(tuple(value) if isinstance(value, list) else value)
        grid = [{**g, key: v} for g in grid for v in parsed]
    out = {}
    for mode in modes:
        for g in grid:
            label = " ".join([mode, *(f"{k}={v}" for k, v in g.items())])
            out[label] = {"mode": mode, **g}
    return out


def sparse_step(step: int, config: RainFusionConfig) -> bool:
    """Whether the backend computes denoising step ``step`` (0-based) sparsely: its dense warm-up rule."""
    return step >= config.warmup_steps


class TrajectoryProbe:
    """Hook for ``models.CaptureAttention`` along the dense trajectory: ARM vs oracle, q/k/v at t = 0.5."""

    def __init__(self, layout, n_layers: int, arm_configs: dict[str, RainFusionConfig], keep_t: float = 0.5):
        self.layout, self.n_layers, self.arm_configs, self.keep_t = layout, n_layers, arm_configs, keep_t
        self.t = 1.0
        self.step = 0
        self.decisions: dict[str, list] = {label: [] for label in arm_configs}  # per call: (step, layer, ...)
        self.kept: dict[int, tuple] = {}

    def on_step(self, step: int, t: float) -> None:
        self.step, self.t = step, t

    def __call__(self, index, q, k, v, **kwargs):
        layer = index % self.n_layers
        if abs(self.t - self.keep_t) < 1e-6:
            self.kept[layer] = (q, k, v)
        recalls_by_variants: dict[tuple, torch.Tensor] = {}
        for label, config in self.arm_configs.items():
            variants = tuple(oracle.variants_of(config))
            if variants not in recalls_by_variants:
                recalls_by_variants[variants] = oracle.exact_recalls(q, k, self.layout, list(variants))
            recalls = recalls_by_variants[variants]
            arm_p, arm_b = oracle.arm_choice(q, k, self.layout, config)
            orc_p, orc_b = oracle.oracle_choice(recalls, config)
            self.decisions[label].append(
                dict(step=self.step, t=self.t, layer=layer, recalls=recalls.cpu(), arm=(arm_p.cpu(), arm_b.cpu()),
                     oracle=(orc_p.cpu(), orc_b.cpu()))
            )  # fmt: skip
        return None


def arm_agreement(decisions: list[dict], config: RainFusionConfig) -> dict:
    """Agreement of the ARM with the oracle over sparse steps; with ``arm_every`` the reused decision counts."""
    agree = total = 0
    lost, lost_all = [], []
    last: dict[int, tuple] = {}
    sparse_calls: dict[int, int] = {}
    for d in decisions:
        if not sparse_step(d["step"], config):
            continue
        n = sparse_calls.get(d["layer"], 0)
        sparse_calls[d["layer"]] = n + 1
        if n % config.arm_every == 0 or d["layer"] not in last:
            last[d["layer"]] = d["arm"]
        arm_p, arm_b = last[d["layer"]]
        orc_p, orc_b = d["oracle"]
        same = (arm_p == orc_p) & ((arm_b - orc_b).abs() < 1e-9)
        r_arm = oracle.recall_of(d["recalls"], config, arm_p, arm_b)
        r_orc = oracle.recall_of(d["recalls"], config, orc_p, orc_b)
        agree += int(same.sum())
        total += same.numel()
        lost += (r_orc - r_arm)[~same].tolist()
        lost_all += (r_orc - r_arm).flatten().tolist()
    return {
        "arm_agreement": agree / total if total else float("nan"),
        "recall_lost_where_differ": sum(lost) / len(lost) if lost else 0.0,
        "recall_lost_mean": sum(lost_all) / len(lost_all) if lost_all else float("nan"),
        "arm_decisions": total,
    }


def achieved_sparsity() -> tuple[float, float, dict, float, float]:
    """From stats(): sparsity over all calls incl. dense warm-up, sparsity over sparse calls, pattern shares,
    the block density of the sparse calls and their mean relative attention error (``measure_error``)."""
    kept = calls = sparse_kept = sparse_calls = blocks = errors = measured = 0.0
    shares: dict[str, float] = {}
    for entry in rf_compile.stats().values():
        if not entry.get("calls"):
            continue
        n_sparse = entry.get("sparse_calls", entry["calls"] - entry.get("dense_calls", 0))
        density = entry.get("density")
        density = 1.0 if density is None else density
        kept += density * n_sparse + (entry["calls"] - n_sparse)
        calls += entry["calls"]
        sparse_kept += density * n_sparse
        sparse_calls += n_sparse
        blocks += (entry.get("block_density") or 0.0) * n_sparse
        if entry.get("attn_rel_err") is not None:
            errors += entry["attn_rel_err"] * n_sparse
            measured += n_sparse
        for head in entry.get("heads", []):
            for kind in ("spatial", "temporal", "textural"):
                shares[kind] = shares.get(kind, 0) + head.get(kind, 0)
    total = sum(shares.values())
    shares = {k: v / total for k, v in shares.items()} if total else {}
    nan = float("nan")
    return (1 - kept / calls if calls else nan, 1 - sparse_kept / sparse_calls if sparse_calls else nan, shares,
            blocks / sparse_calls if sparse_calls else nan, errors / measured if measured else nan)  # fmt: skip


@torch.no_grad()
def flow_losses(model, name, size, device, dtype, batch, batches, on_step=None) -> float:
    """Mean held-out flow loss over ``batches`` x 8 timesteps (same clips and noise for every mode).

    The 8 timesteps of a batch run high to low, as a trajectory: ``on_step(i)`` is told each one's index."""
    losses = []
    for b in range(batches):
        video, tokens = sample_batch(batch, HELDOUT_SEED + 100 + b, device=device, **size)
        text = models.conditions(tokens, {}, dtype)
        g = torch.Generator().manual_seed(HELDOUT_SEED + 100 + b)
        for i in reversed(range(8)):  # high to low, as a trajectory: the backend's step clock follows it
            t = (i + 0.5) / 8
            noise = torch.randn(video.shape, generator=g).to(device)
            x = ((1 - t) * video + t * noise).to(dtype)
            if on_step is not None:
                on_step(7 - i)
            pred = models.predict(model, name, x, torch.full((batch,), t, device=device, dtype=dtype), text)
            losses.append(F.mse_loss(pred.float(), noise - video).item())
    return sum(losses) / len(losses)


def random_mask_hook(density: float, layout, step_of, config: RainFusionConfig, seed: int = 0):
    """SDPA hook: video query rows see a random subset of video keys (density ``density``), text dense."""
    g = torch.Generator().manual_seed(seed)

    def hook(index, q, k, v, **kwargs):
        if not sparse_step(step_of(), config):
            return None
        N = q.shape[-2]
        keep = torch.rand(q.shape[1], N, N, generator=g).to(q.device) < density
        video = torch.zeros(N, dtype=torch.bool, device=q.device)
        video[layout.video_slice] = True
        keep |= ~(video[:, None] & video[None, :])
        keep |= torch.eye(N, dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None])

    return hook


def oracle_hook(density_at, layout, block: int, kept: list):
    """SDPA hook: attention under the oracle block mask (``oracle.py``) of ``density_at()``, this call's density
    (``None``: plain SDPA); appends each masked call's block density (forced text blocks included) to ``kept``."""

    def hook(index, q, k, v, **kwargs):
        density = density_at()
        if density is None:
            return None
        mask = oracle.oracle_mask(q, k, layout, density, block)
        kept.append(mask.float().mean().item())
        return oracle.block_masked_attention(q, k, v, mask, block)

    return hook


def oracle_gap(records: list[dict]) -> None:
    """``gap_to_oracle_db`` of every mode record: the oracle curve's PSNR at the mode's sparse-call block
    density (linear between oracle points, the nearest point beyond them) minus the mode's PSNR."""
    for name in {r["model"] for r in records}:
        curve = sorted((r["block_density"], r["psnr_db"]) for r in records
                       if r["model"] == name and r["mode"] == "oracle")  # fmt: skip
        if not curve:
            continue
        xs, ys = [c[0] for c in curve], [c[1] for c in curve]
        for r in records:
            d = r.get("block_density")
            if r["model"] != name or r["mode"] in ("oracle", "dense", "random-mask") or d is None or d != d:
                continue
            if d <= xs[0] or len(xs) == 1:
                at = ys[0]
            elif d >= xs[-1]:
                at = ys[-1]
            else:
                i = next(i for i in range(1, len(xs)) if xs[i] >= d)
                at = ys[i - 1] + (ys[i] - ys[i - 1]) * (d - xs[i - 1]) / (xs[i] - xs[i - 1])
            r["gap_to_oracle_db"] = at - r["psnr_db"]


def evaluate_model(name: str, folder: Path, args, deadline: float, device, dtype) -> tuple[list[dict], list[str], dict]:
    model, card = models.load(folder, name, dtype=dtype, device=device)
    _, f, h, w = card["latent_shape"]
    size = dict(frames=args.frames or f, height=args.height or h, width=args.width or w)
    layout = models.layout_of(name, **size)
    n_layers = model.config.num_layers
    clips, tokens = sample_batch(args.batch, EVAL_SEED, device=device, **size)
    text = models.conditions(tokens, card, dtype)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(EVAL_SEED)).to(device, dtype)
    print(f"[{name}] {layout.describe()}, batch {args.batch}, {args.steps} steps; {describe(tokens)}", flush=True)

    modes = args.mode_table
    arm_configs = {
        label: RainFusionConfig.from_options({"num_steps": args.steps, **opts})[0] for label, opts in modes.items()
        if opts.get("mode", "v1") in ("v1", "v1+")
    }  # fmt: skip
    probe = TrajectoryProbe(layout, n_layers, arm_configs)
    t0 = time.time()
    with models.CaptureAttention(probe):
        dense = models.sample(model, name, noise, text, args.steps, on_step=probe.on_step)
    other = models.sample(model, name, torch.randn(clips.shape, generator=torch.Generator().manual_seed(1)).to(
        device, dtype), text, args.steps)  # fmt: skip
    loss_dense = flow_losses(model, name, size, device, dtype, args.batch, args.loss_batches)
    print(f"[{name}] dense trajectory + oracle {time.time() - t0:.1f}s, held-out loss {loss_dense:.4f}", flush=True)

    settings = dict(steps=args.steps, batch=args.batch, layout=layout.describe(), loss_batches=args.loss_batches)
    base = dict(model=name, **settings)
    records = [
        dict(base, mode="dense", setting="dense other-noise", options={}, sparsity=0.0,
             psnr_db=psnr(other, dense).mean().item(), ssim=ssim(other, dense).mean().item(), loss_increase=0.0,
             loss=loss_dense),
    ]  # fmt: skip
    samples = {"dense": dense}
    skipped = []
    # The oracle curve: the best block mask at each density, on the same sparse steps.
    config = RainFusionConfig(num_steps=args.steps)
    state = {"step": 0}
    for density in args.oracle_densities:
        if time.time() > deadline:
            skipped.append(f"{name}: oracle d={density}")
            continue
        kept: list[float] = []

        def sparse_density(d: float = density) -> float | None:  # the oracle's density on the sparse steps
            return d if sparse_step(state["step"], config) else None

        hook = oracle_hook(sparse_density, layout, args.block, kept)
        t1 = time.time()
        with models.CaptureAttention(hook):
            out = models.sample(model, name, noise, text, args.steps, on_step=lambda i, t: state.update(step=i))
            block_density = sum(kept) / len(kept) if kept else float("nan")
            loss = flow_losses(model, name, size, device, dtype, args.batch, args.loss_batches,
                               on_step=lambda i: state.update(step=i))  # fmt: skip
        records.append(dict(base, mode="oracle", setting=f"oracle d={density}", options={"density": density},
                            block_density=block_density, psnr_db=psnr(out, dense).mean().item(),
                            ssim=ssim(out, dense).mean().item(), loss=loss,
                            loss_increase=(loss - loss_dense) / loss_dense))  # fmt: skip
        print(f"[{name}] oracle d={density}: blocks {block_density:.3f} PSNR {records[-1]['psnr_db']:.2f} dB loss "
              f"+{100 * records[-1]['loss_increase']:.2f}% ({time.time() - t1:.1f}s)", flush=True)  # fmt: skip
    if dtype != torch.float32:  # the numeric floor: dense in float32 against dense in this dtype
        exact = models.sample(model.float(), name, noise.float(), text.float(), args.steps)
        model.to(dtype)
        records.append(dict(base, mode="dense", setting="dense float32 (numeric floor)", options={}, sparsity=0.0,
                            psnr_db=psnr(exact, dense).mean().item(), ssim=ssim(exact, dense).mean().item()))
    # Calibrated profiles: measured on other noise and conditions (held out from the evaluation's), then applied.
    calibrated = {}
    goals = [("target", t) for t in args.calibrate_targets] + [("density", d) for d in args.calibrate_densities]
    if goals and time.time() > deadline:
        skipped.extend(f"{name}: profile {kind}={value}" for kind, value in goals)
    elif goals:
        cal_clips, cal_tokens = sample_batch(args.batch, EVAL_SEED + 1, device=device, **size)
        cal_text = models.conditions(cal_tokens, card, dtype)
        cal_noise = torch.randn(cal_clips.shape, generator=torch.Generator().manual_seed(EVAL_SEED + 1))
        cal_noise = cal_noise.to(device, dtype)
        options = {"num_steps": args.steps, **args.compile_options, **args.calibrate_options}
        measured = rf_compile.calibrate(model, run=lambda m: models.sample(m, name, cal_noise, cal_text, args.steps),
                                        options=options, progress=False, **dict(goals[:1]))  # fmt: skip
        print(f"[{name}] calibrated in {measured['seconds']} s", flush=True)
        for kind, value in goals:  # one measurement, every goal chosen from its errors
            path = args.out / f"profile_{name}_{kind}{value}.json"
            profile = rf_compile.retarget(measured, **{kind: value})
            path.write_text(json.dumps(profile, indent=1))
            print(f"[{name}] profile {kind}={value}: mean density {profile['mean_density']:.3f}", flush=True)
            calibrated[f"profile {kind}={value}"] = {"mode": "v2", **args.calibrate_options, "profile": str(path)}
    for label, opts in {**calibrated, **modes}.items():
        if time.time() > deadline:
            skipped.append(f"{name}: {label}")
            continue
        # Warm-up: the first 10% of this loop's steps. Quality of the sparse path: never priced dense.
        opts = {"num_steps": args.steps, "cost_model": False, **args.compile_options, **opts}
        config = RainFusionConfig.from_options(opts)[0]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="rainfusion", options={**opts, "measure_error": True}, dynamic=False)
        rf_compile.reset()
        t1 = time.time()
        out = models.sample(compiled, name, noise, text, args.steps)
        sample_s = time.time() - t1
        sparsity, sparse_call_sparsity, shares, block_density, attn_rel_err = achieved_sparsity()
        rf_compile.reset()
        loss = flow_losses(compiled, name, size, device, dtype, args.batch, args.loss_batches)
        cosines = []
        for layer in range(n_layers if "profile" not in opts else 0):  # a profile applies to the model's sites
            if layer in probe.kept:
                q, k, v = probe.kept[layer]
                ref = F.scaled_dot_product_attention(q, k, v)
                got = rf_compile.sparse_attention(q, k, v, layout, config=config)
                cosines.append(round(F.cosine_similarity(got.float().flatten(), ref.float().flatten(), 0).item(), 5))
        record = dict(
            base, mode=opts.get("mode", "v1"), setting=label, options=opts, sparsity=sparsity,
            sparse_call_sparsity=sparse_call_sparsity, block_density=block_density, attn_rel_err=attn_rel_err,
            psnr_db=psnr(out, dense).mean().item(), ssim=ssim(out, dense).mean().item(), loss=loss,
            loss_increase=(loss - loss_dense) / loss_dense, layer_cosine=cosines, pattern_share=shares,
            seconds_compile_and_sample=round(sample_s, 2),
        )  # fmt: skip
        if label in arm_configs:
            record.update(arm_agreement(probe.decisions[label], config))
        records.append(record)
        samples[label] = out
        print(f"[{name}] {label:22s} sparsity {sparsity:.3f} blocks {block_density:.3f} err {attn_rel_err:.3f} "
              f"PSNR {record['psnr_db']:.2f} dB SSIM "
              f"{record['ssim']:.4f} loss +{100 * record['loss_increase']:.2f}% "
              f"ARM/oracle {record.get('arm_agreement', float('nan')):.3f} ({sample_s:.1f}s)", flush=True)  # fmt: skip

    oracle_gap(records)

    # Reference row: a random mask at the density v1 reached on its sparse calls.
    v1 = next((r for r in records if r["setting"] == "v1"), None)
    if v1 is not None and v1["sparse_call_sparsity"] == v1["sparse_call_sparsity"]:
        config = RainFusionConfig(num_steps=args.steps)
        density = 1 - v1["sparse_call_sparsity"]
        state = {"step": 0}
        hook = random_mask_hook(density, layout, lambda: state["step"], config)
        with models.CaptureAttention(hook):
            out = models.sample(model, name, noise, text, args.steps, on_step=lambda i, t: state.update(step=i))
        records.append(dict(base, mode="random-mask", setting="random-mask", options={"density": density},
                            sparsity=v1["sparsity"],
                            psnr_db=psnr(out, dense).mean().item(), ssim=ssim(out, dense).mean().item(),
                            loss_increase=float("nan")))  # fmt: skip
        samples["random-mask"] = out
    strip = [("dense", dense[0])] + [(label, samples[label][0]) for label in ("v1", "v1+", "v2 s=0.8", "random-mask")
                                     if label in samples]  # fmt: skip
    frame_strip(strip, args.out / f"strip_{name}.png")
    return records, skipped, settings


def plot_pareto(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        curve = sorted((r["block_density"], r["psnr_db"]) for r in records
                       if r["model"] == name and r["mode"] == "oracle")  # fmt: skip
        if curve:
            ax.plot(*zip(*[(1 - d, p) for d, p in curve]), "k--", lw=1, marker=".", label="oracle block mask")
        for r in records:
            if r["model"] != name or not math.isfinite(r["psnr_db"]) or r["mode"] in ("dense", "oracle"):
                continue
            family = r["mode"]
            marker = {"v1": "o", "v1+": "s", "v2": "^", "random-mask": "x"}.get(family, "D")
            blocks = r.get("block_density")
            x = 1 - blocks if blocks is not None and math.isfinite(blocks) else r["sparsity"]
            ax.scatter(x, r["psnr_db"], marker=marker, s=30)
            ax.annotate(r["setting"], (x, r["psnr_db"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ref = [r["psnr_db"] for r in records if r["model"] == name and r["mode"] == "dense"]
        if ref:
            ax.axhline(ref[0], color="grey", ls=":", lw=1, label="dense vs dense, other noise")
            ax.legend(fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("block sparsity of the sparse steps (1 - block density; random mask: its sparsity)")
        ax.set_ylabel("PSNR vs dense sample (dB)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    parser.add_argument("--models-dir", type=Path, default=here / "models")
    parser.add_argument("--models", nargs="+", default=list(models.NAMES))
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<gpu>/trained")
    parser.add_argument("--modes", nargs="+", default=None, help=f"labels of {list(DEFAULT_MODES)}")
    parser.add_argument("--sweep", action="append", default=[], help="KEY=V1,V2 (repeat for a grid)")
    parser.add_argument("--sweep-modes", default="v1", help="comma-separated base modes of the sweep")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps of the sampling loop")
    parser.add_argument("--batch", type=int, default=4, help="clips per sample/loss batch")
    parser.add_argument("--loss-batches", type=int, default=1)
    parser.add_argument("--frames", type=int, default=None, help="default: the model card's latent shape")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--oracle-densities", type=lambda v: [float(x) for x in v.split(",")] if v else [],
                        default=[0.2, 0.3, 0.4, 0.5, 0.6],
                        help="block densities of the oracle rows (comma-separated; '': none, no gap column)")
    parser.add_argument("--block", type=int, default=128, help="block size of the oracle (the kernel's)")
    parser.add_argument("--calibrate-targets", type=lambda v: [float(x) for x in v.split(",")] if v else [],
                        default=[], help="rows of profiles calibrated to these attention errors (comma-separated)")
    parser.add_argument("--calibrate-densities", type=lambda v: [float(x) for x in v.split(",")] if v else [],
                        default=[], help="rows of profiles at these mean block densities (least squared error)")
    parser.add_argument("--calibrate-options", type=json.loads, default={"order": "tokens"},
                        help="v2 options (JSON) the profiles are calibrated and applied with")
    parser.add_argument("--budget-minutes", type=float, default=3.0, help="after this, remaining modes are skipped")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: 4x16x24, batch 1, 4 steps, v1 only, compiler='eager'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.tiny:
        args.frames, args.height, args.width = args.frames or 4, args.height or 16, args.width or 24
        args.batch, args.steps, args.modes = 1, 4, args.modes or ["v1"]
    # The tiny run checks the harness: the rewritten graphs run without inductor's C++ compiles (same sites).
    args.compile_options = {"compiler": "eager"} if args.tiny else {}
    table = parse_sweep(args.sweep, args.sweep_modes.split(",")) if args.sweep else {}
    if args.modes or not table:
        unknown = set(args.modes or []) - set(DEFAULT_MODES)
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}; known: {list(DEFAULT_MODES)}")
        table = {**{m: DEFAULT_MODES[m] for m in (args.modes or DEFAULT_MODES)}, **table}
    args.mode_table = table
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment()
    results = Path(__file__).resolve().parent.parent / "results"
    args.out = args.out or results / gpu_slug(env.get("gpu", "cpu")) / "trained"
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()

    start = time.time()
    present = [n for n in args.models if (args.models_dir / n / "model_card.json").exists()]
    if not present:
        sys.exit(f"no model folders with model_card.json under {args.models_dir} for {args.models}")
    records, skipped, settings = [], [], {}
    for i, name in enumerate(present):
        deadline = start + args.budget_minutes * 60 * (i + 1) / len(present)
        recs, skip, settings[name] = evaluate_model(name, args.models_dir / name, args, deadline, device, dtype)
        records += recs
        skipped += skip
    env.update(settings=settings, modes=table, skipped=skipped, seconds=round(time.time() - start, 1))
    (args.out / "fidelity.json").write_text(json.dumps({"environment": env, "records": records}, indent=1))
    columns = ["model", "setting", "sparsity", "block_density", "attn_rel_err", "psnr_db", "gap_to_oracle_db", "ssim",
               "loss_increase", "arm_agreement", "recall_lost_where_differ"]  # fmt: skip
    md = [f"# Trained-model fidelity, sparse vs dense\n\n`{env['command']}`\n", markdown_table(records, columns)]
    if skipped:
        md.append(f"\nSkipped (time budget): {', '.join(skipped)}")
    (args.out / "fidelity.md").write_text("\n".join(md) + "\n")
    plot_pareto(records, args.out / "pareto.png")
    print(f"wrote {args.out} in {time.time() - start:.0f}s; skipped {skipped}", flush=True)


if __name__ == "__main__":
    main()
