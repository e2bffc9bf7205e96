"""Did a model learn attention structure? Per layer and head: exact recall of the RainFusion masks.

For a few held-out clips at a few timesteps, the full attention map of every self-attention head
gives the exact recall (softmax mass kept) of the spatial, temporal and textural masks at the
default bandwidth and stride, next to each mask's density (the recall a structureless head would
get), and the pattern the ARM (``rf_compile.classify_heads``) picks. The same for randomly
initialised weights of the same architecture.

    python benchmarks/fidelity/analyze.py --model-dir benchmarks/fidelity/models/wan --out recall.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import models
import oracle
import torch
from data import sample_batch

from rf_compile import RainFusionConfig

# The paper's ARM: its three masks, the checkerboard for textural heads, threshold 0.8.
PAPER_V1 = RainFusionConfig(textural="checkerboard")

KINDS = ("spatial", "temporal", "textural")


@torch.no_grad()
def head_recalls(
    model,
    name: str,
    clips: torch.Tensor,
    tokens: torch.Tensor,
    ts: list[float],
    seed: int = 0,
    config: RainFusionConfig | None = None,
) -> dict:
    """Per layer and head: mean exact recall of each mask and the ARM's picks, over clips x timesteps."""
    config = config or PAPER_V1
    variants = [("spatial", config.bandwidth), ("temporal", config.bandwidth), ("textural", config.stride)]
    dtype = next(model.parameters()).dtype
    text = models.conditions(tokens, {}, dtype)
    _, _, frames, height, width = clips.shape
    layout = models.layout_of(name, frames, height, width)
    g = torch.Generator().manual_seed(seed)
    sums: dict[int, torch.Tensor] = {}
    picks: dict[int, torch.Tensor] = {}
    for t in ts:
        noise = torch.randn(clips.shape, generator=g).to(clips.device)
        x = ((1 - t) * clips + t * noise).to(dtype)
        tt = torch.full((clips.shape[0],), t, device=clips.device, dtype=dtype)
        for layer, (q, k, _) in enumerate(models.capture_qkv(model, name, x, tt, text)):
            recalls = oracle.exact_recalls(q, k, layout, variants).sum(0).cpu()  # [H, 3]
            chosen = oracle.arm_choice(q, k, layout, config)[0].cpu()  # [B, H]
            counts = torch.stack([(chosen == p).sum(0) for p in (oracle.SPATIAL, oracle.TEMPORAL, oracle.TEXTURAL)], -1)
            sums[layer] = sums.get(layer, 0) + recalls
            picks[layer] = picks.get(layer, 0) + counts
    n_layers_seen = len(sums)
    sums = torch.stack([sums[i] for i in range(n_layers_seen)]) / (len(ts) * clips.shape[0])
    picks = torch.stack([picks[i] for i in range(n_layers_seen)])
    layers = []
    for layer in range(n_layers_seen):
        heads = []
        for h in range(sums.shape[1]):
            heads.append(
                {
                    **{f"recall_{kind}": round(float(sums[layer, h, i]), 4) for i, kind in enumerate(KINDS)},
                    **{f"arm_{kind}": int(picks[layer, h, i]) for i, kind in enumerate(KINDS)},
                }
            )
        layers.append(heads)
    all_picks = picks.sum((0, 1))
    return {
        "layers": layers,
        "mean_recall": {kind: round(float(sums[..., i].mean()), 4) for i, kind in enumerate(KINDS)},
        "arm_share": {kind: round(float(all_picks[i] / all_picks.sum()), 4) for i, kind in enumerate(KINDS)},
        "heads_above_alpha": {kind: int((sums[..., i] >= config.threshold).sum()) for i, kind in enumerate(KINDS)},
    }


def recall_report(
    model,
    name: str,
    *,
    frames: int,
    height: int,
    width: int,
    device,
    clips: int = 2,
    seed: int = 10**6,
    ts: tuple[float, ...] = (0.25, 0.5, 0.75),
) -> dict:
    """Trained model vs the same architecture with random weights (diffusers' initialisation)."""
    config = PAPER_V1
    video, tokens = sample_batch(clips, seed, frames, height, width, device)
    layout = models.layout_of(name, frames, height, width)
    dtype = next(model.parameters()).dtype
    random_model = models.build(name, seed=0).to(device=device, dtype=dtype).eval()
    return {
        "settings": {
            "bandwidth": config.bandwidth, "stride": config.stride, "alpha": config.threshold, "clips": clips,
            "data_seed": seed, "timesteps": list(ts), "layout": layout.describe(),
            "note": "recall = softmax mass inside the mask, mean over video query rows, clips and timesteps",
        },
        "mask_density": {kind: round(oracle.density(layout, kind, p), 4) for kind, p in
                         (("spatial", config.bandwidth), ("temporal", config.bandwidth), ("textural", config.stride))},
        "trained": head_recalls(model, name, video, tokens, list(ts), config=config),
        "random": head_recalls(random_model, name, video, tokens, list(ts), config=config),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--frames", type=int, default=None, help="default: the model card's latent shape")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, card = models.load(args.model_dir, dtype=dtype, device=args.device)
    _, f, h, w = card["latent_shape"]
    report = recall_report(
        model, card["name"], frames=args.frames or f, height=args.height or h, width=args.width or w,
        device=args.device, clips=args.clips,
    )  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1))
    print("mask density", report["mask_density"])
    for which in ("trained", "random"):
        print(which, "mean recall", report[which]["mean_recall"], "ARM share", report[which]["arm_share"])


if __name__ == "__main__":
    main()
