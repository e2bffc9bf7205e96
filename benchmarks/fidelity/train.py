"""Train one fidelity model (rectified flow on procedural video), time-boxed, and ship it.

Writes ``<out>/<model>/``: the files of ``save_pretrained`` (bf16 safetensors, EMA weights),
``model_card.json``, ``loss.png``, ``example_inputs.safetensors`` (one evaluation forward at
timestep 500), ``dense_samples.png`` (data clips next to dense samples of the same conditions)
and ``attention_recall.json`` (``analyze.py``: mask recall per layer/head, trained vs random).

    python benchmarks/fidelity/train.py --model wan --minutes 3.4 --out /tmp/fidelity  # GPU
    python benchmarks/fidelity/train.py --model wan --tiny --minutes 1 --out /tmp/fidelity  # CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import analyze
import models
import torch
import torch.nn.functional as F
from data import TEXT_LEN, VOCAB, describe, sample_batch
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file

HELDOUT_SEED = 10**9  # held-out clips use seeds from here on; training uses seed * 10**7 + step
DEFAULT_SIZE = dict(frames=16, height=32, width=48)
TINY_SIZE = dict(frames=4, height=16, width=24)


def lr_at(step: int, progress: float, lr: float, warmup: int = 200) -> float:
    """Linear warm-up, constant, then a cosine decay to 10% over the second half of the time box."""
    scale = min(1.0, (step + 1) / warmup)
    if progress > 0.5:
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - 0.5) / 0.5)))
    return lr * scale


def flow_loss(model, name: str, video, tokens, t, noise, autocast) -> torch.Tensor:
    """Rectified-flow loss: MSE of the velocity prediction against ``noise - video``."""
    dtype = next(model.parameters()).dtype
    text = models.conditions(tokens, {}, dtype)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * video + t.view(-1, 1, 1, 1, 1) * noise
    with autocast:
        pred = models.predict(model, name, x_t.to(dtype), t.to(dtype), text)
    return F.mse_loss(pred.float(), (noise - video).float())


@torch.no_grad()
def heldout_loss(model, name: str, size: dict, device, batches: int = 2, batch: int = 4, autocast=None) -> float:
    """Mean flow loss over fixed held-out clips at 8 evenly spaced timesteps."""
    autocast = autocast or torch.autocast("cpu", enabled=False)
    losses = []
    for b in range(batches):
        video, tokens = sample_batch(batch, HELDOUT_SEED + b, device=device, **size)
        g = torch.Generator().manual_seed(HELDOUT_SEED + b)
        for i in range(8):
            noise = torch.randn(video.shape, generator=g).to(device)
            t = torch.full((batch,), (i + 0.5) / 8, device=device)
            losses.append(flow_loss(model, name, video, tokens, t, noise, autocast).item())
    return sum(losses) / len(losses)


def plot_loss(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth, value = [], losses[0]
    for x in losses:
        value = 0.98 * value + 0.02 * x
        smooth.append(value)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.25, lw=0.5, label="per step")
    ax.plot(steps, smooth, lw=1.5, label="EMA 0.98")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def frame_strip(rows: list[tuple[str, torch.Tensor]], path: Path, frames: int = 8) -> None:
    """PNG: one row per (label, video [3, F, H, W] in [-1, 1]), ``frames`` evenly spaced frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    F_ = rows[0][1].shape[1]
    picks = sorted({round(i * (F_ - 1) / max(frames - 1, 1)) for i in range(frames)})
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(1.6 * len(picks), 1.25 * len(rows)), squeeze=False)
    for r, (label, video) in enumerate(rows):
        for c, f in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(((video[:, f].float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=models.NAMES, required=True)
    parser.add_argument("--minutes", type=float, default=3.4, help="training time box (wall clock)")
    parser.add_argument("--out", type=Path, required=True, help="folder that gets <model>/")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (4 with --tiny)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help=f"CPU development size {TINY_SIZE}")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    diffusers_logging.set_verbosity_error()
    device = torch.device(args.device)
    size = TINY_SIZE if args.tiny else DEFAULT_SIZE
    batch = args.batch or (4 if args.tiny else 8)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    folder = args.out / args.model
    folder.mkdir(parents=True, exist_ok=True)
    layout = models.layout_of(args.model, size["frames"], size["height"], size["width"])
    print(f"[{args.model}] {models.CONFIGS[args.model]}", flush=True)
    print(f"[{args.model}] video {size}, layout {layout.describe()}, batch {batch}, {args.minutes} min on {device}")

    model = models.build(args.model, seed=args.seed).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"[{args.model}] {sum(p.numel() for p in params) / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    g = torch.Generator(device).manual_seed(args.seed)

    steps, losses = [], []
    start = time.time()
    budget = args.minutes * 60
    step, last_print = 0, start
    while True:
        elapsed = time.time() - start
        if elapsed >= budget:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, elapsed / budget, args.lr, args.warmup)
        video, tokens = sample_batch(batch, args.seed * 10**7 + step, device=device, **size)
        t = torch.rand(batch, generator=g, device=device)
        noise = torch.randn(video.shape, generator=g, device=device)
        loss = flow_loss(model, args.model, video, tokens, t, noise, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        steps.append(step)
        losses.append(loss.item() if step % 10 == 0 or not cuda else float("nan"))
        step += 1
        if time.time() - last_print > 15:
            last_print = time.time()
            recent = [x for x in losses[-200:] if x == x]
            print(f"[{args.model}] step {step} {elapsed:6.1f}s loss {sum(recent) / len(recent):.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {step / max(elapsed, 1e-9):.1f} it/s", flush=True)  # fmt: skip
    train_s = time.time() - start
    kept = [(s, x) for s, x in zip(steps, losses) if x == x]
    steps, losses = [s for s, _ in kept], [x for _, x in kept]
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    print(f"[{args.model}] trained {step} steps in {train_s:.0f}s, final loss {final_loss:.4f}", flush=True)

    heldout = heldout_loss(ema, args.model, size, device, autocast=autocast)
    print(f"[{args.model}] held-out loss (EMA weights) {heldout:.4f}", flush=True)
    ema.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    ema.to(torch.float32)

    # -- example inputs of one evaluation forward at timestep ~500 ---------------------------
    video, tokens = sample_batch(2, HELDOUT_SEED, device=device, **size)
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(HELDOUT_SEED)).to(device)
    x = 0.5 * video + 0.5 * noise
    kwargs = models.forward_kwargs(args.model, x, torch.full((2,), 0.5, device=device), models.conditions(tokens, {}))
    tensors = {k: v.contiguous().cpu() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    if "image_rotary_emb" in kwargs:
        tensors["image_rotary_emb_cos"], tensors["image_rotary_emb_sin"] = (r.contiguous().cpu() for r in
                                                                            kwargs["image_rotary_emb"])  # fmt: skip
    save_file(tensors, folder / "example_inputs.safetensors", metadata={"conditions": json.dumps(describe(tokens))})

    # -- dense samples next to data clips of the same conditions ------------------------------
    video, tokens = sample_batch(3, HELDOUT_SEED + 7, device=device, **size)
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(7)).to(device)
    with autocast:
        samples = models.sample(ema, args.model, noise, models.conditions(tokens, {}), args.sample_steps)
    rows = []
    for i, text in enumerate(describe(tokens)):
        rows += [(f"data:\n{text}", video[i]), (f"dense sample ({args.sample_steps} steps)", samples[i])]
    frame_strip(rows, folder / "dense_samples.png")
    plot_loss(steps, losses, folder / "loss.png", f"{args.model}: {step} steps, batch {batch}, {train_s / 60:.1f} min")

    card = {
        "name": args.model,
        "class": models.model_class(args.model).__name__,
        "latent_shape": [3, size["frames"], size["height"], size["width"]],
        "text_shape": [TEXT_LEN, models.TEXT_DIM],
        "layout": layout.describe(),
        "video_tokens": layout.video_tokens,
        "vocab": VOCAB,
        "text_table_seed": 1234,
        "training": {
            "command": " ".join(["python", *sys.argv]),
            "seed": args.seed,
            "steps": step,
            "batch": batch,
            "minutes": round(train_s / 60, 2),
            "optimizer": f"AdamW lr {args.lr} wd 0.01 betas (0.9, 0.99), warm-up {args.warmup} steps, "
            "cosine to 10% over the second half, grad clip 1.0",
            "ema": 0.999,
            "precision": "bf16 autocast" if cuda else "float32",
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "final_loss": round(final_loss, 5),
            "heldout_loss": round(heldout, 5),
        },
        "objective": "rectified flow: x_t = (1 - t) x0 + t noise, target noise - x0, timestep = 1000 t, t ~ U(0, 1)",
        "sampling": "Euler from t = 1 to 0, timesteps 1000 * (1 - i / steps)",
        "weights": "EMA weights, stored bf16",
        "data": "benchmarks/fidelity/data.py: textured sprites moving/rotating/scaling/occluding over a panning "
        "textured background with lighting changes; pixels in [-1, 1] are the latent",
        "example_inputs": "example_inputs.safetensors: keyword tensors of one forward at timestep 500 (batch 2)",
    }
    (folder / "model_card.json").write_text(json.dumps(card, indent=1))

    # -- attention structure: trained vs random weights ---------------------------------------
    ema.to(torch.bfloat16 if cuda else torch.float32)
    try:
        report = analyze.recall_report(ema, args.model, device=device, **size)
    except Exception as error:  # the model is shipped even if the analysis breaks
        report = {"error": repr(error)}
        print(f"[{args.model}] attention analysis failed: {error!r}", flush=True)
    (folder / "attention_recall.json").write_text(json.dumps(report, indent=1))
    if "error" not in report:
        print(f"[{args.model}] mask density {report['mask_density']}")
        for which in ("trained", "random"):
            r = report[which]
            print(f"[{args.model}] {which}: mean recall {r['mean_recall']}, ARM share {r['arm_share']}")
    size_mib = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    print(f"[{args.model}] wrote {folder} ({size_mib:.1f} MiB): {sorted(f.name for f in folder.iterdir())}", flush=True)


if __name__ == "__main__":
    main()
