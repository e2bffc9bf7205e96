"""Fidelity of the ARM's choices on synthetic heads with a planted pattern.

For each layout (the three real ones on a GPU, small ones with ``--small``), each config and
each planted head type (spatial, temporal, textural, mixed): the ARM's accuracy against the
planted type, its estimated recall against the exact recall of the chosen mask (softmax mass
kept over all query rows and keys), the relative L2 error of the output against dense
attention, and the sparsity achieved. Writes ``fidelity.json``, ``fidelity.md`` and
``fidelity.png`` (error vs sparsity) under ``benchmarks/results/<gpu>/``.

    python benchmarks/fidelity.py            # GPU, real layouts
    python benchmarks/fidelity.py --small    # CPU smoke run
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from utils import environment, gpu_slug, markdown_table, write_results

from rf_compile import Pattern, RainFusionConfig, VideoLayout
from rf_compile.ops import arm
from rf_compile.ops.attention import v2_plan
from rf_compile.ops.executors import choose_kernel, run_plan
from rf_compile.plan import build_plan_table, element_mask, variants_for
from rf_compile.reference.synthetic import planted_qk

REAL_LAYOUTS = {
    "CogVideoX-5B": (VideoLayout(13, 30, 45, prefix=226), 64),
    "HunyuanVideo": (VideoLayout(32, 30, 40, suffix=256), 128),
    "Wan2.1-14B": (VideoLayout(21, 30, 52), 128),
}
SMALL_LAYOUTS = {
    "small-text-first": (VideoLayout(5, 8, 10, prefix=12), 64),
    "small-text-last": (VideoLayout(6, 7, 9, suffix=10), 64),
}
CONFIGS = {
    "v1": {},
    "v1+": {"mode": "v1+"},
    "v1 b=0.18 tau=3": {"bandwidth": 0.18, "stride": 3},
    "v1 b=0.13 tau=4": {"bandwidth": 0.13, "stride": 4},
    "v2 s=0.8 topk": {"mode": "v2", "sparsity": 0.8, "select": "topk"},
    "v2 s=0.8 mass=0.9": {"mode": "v2", "sparsity": 0.8, "select": "mass", "mass": 0.9},
}
PLANTED = {"spatial": Pattern.SPATIAL, "temporal": Pattern.TEMPORAL, "textural": Pattern.TEXTURAL, "mixed": None}


def exact_recall(q, k, table, variant_of_head, scale, chunk=4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax mass inside each head's mask and the share of scores it keeps, over video query rows.

    Returns two float64 [B, H] tensors (recall, kept fraction).
    """
    layout = table.layout
    B, H = variant_of_head.shape
    video_rows = torch.arange(layout.prefix, layout.prefix + layout.video_tokens, device=q.device)
    kept_mass = torch.zeros(B, H, dtype=torch.float64, device=q.device)
    kept_scores = torch.zeros(B, H, dtype=torch.float64, device=q.device)
    for start in range(0, len(video_rows), chunk):
        rows = video_rows[start : start + chunk]
        masks = {p: element_mask(table, p, rows) for p in variant_of_head.unique().tolist()}
        scores = torch.einsum("bhrd,bhnd->bhrn", q[:, :, rows].float(), k.float()) * scale
        probs = torch.softmax(scores, dim=-1)
        for b in range(B):
            for h in range(H):
                mask = masks[int(variant_of_head[b, h])]
                kept_mass[b, h] += (probs[b, h] * mask).sum(dtype=torch.float64)
                kept_scores[b, h] += mask.sum(dtype=torch.float64)
    return kept_mass / len(video_rows), kept_scores / (len(video_rows) * layout.seq_len)


def run_case(layout, head_dim, config, planted, heads, device, dtype, seed) -> dict:
    q, k = planted_qk(layout, [planted] * heads, head_dim=head_dim, seed=seed, dtype=dtype)
    q, k = q.to(device), k.to(device)
    v = torch.randn_like(q)
    scale = head_dim**-0.5
    if config.mode == "v2":
        table, variant_of_head = v2_plan(q, k, layout, config, scale)
        recall_estimated = torch.full(variant_of_head.shape, float("nan"), device=device)
        chosen = None
    else:
        variants = variants_for(config)
        variant_of_head, recall_estimated = arm.decide(q, k, layout, config, scale)
        table = build_plan_table(layout, variants, device)
        chosen = torch.tensor([v.pattern for v in variants], device=device)[variant_of_head]
    out = run_plan(q, k, v, table, variant_of_head, None, scale, choose_kernel(config.kernel, q, k, None)[0])
    dense = F.scaled_dot_product_attention(q, k, v, scale=scale)
    known = ~recall_estimated.isnan()
    recall_exact, kept = exact_recall(q, k, table, variant_of_head, scale)
    return {
        "accuracy": float("nan") if planted is None or chosen is None else (chosen == planted).double().mean().item(),
        "recall_estimated": recall_estimated[known].double().mean().item() if known.any() else float("nan"),
        "recall_exact": recall_exact.mean().item(),
        "recall_exact_of_estimated": recall_exact[known].mean().item() if known.any() else float("nan"),
        "rel_l2": ((out.double() - dense.double()).norm() / dense.double().norm()).item(),
        "sparsity": 1.0 - kept.mean().item(),
        "chosen": {} if chosen is None else {p.name.lower(): int((chosen == p).sum()) for p in Pattern},
    }


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip(PLANTED, "osD^"))
    for color, config in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], CONFIGS):
        for planted, marker in markers.items():
            rows = [r for r in records if r["config"] == config and r["planted"] == planted]
            points = [(r["sparsity"], r["rel_l2"]) for r in rows]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, color=color, marker=marker, label=f"{config} / {planted}", alpha=0.8)
    ax.set_xlabel("sparsity (fraction of scores skipped)")
    ax.set_ylabel("relative L2 error vs dense")
    ax.set_yscale("log")
    ax.set_title("RainFusion on planted heads: output error vs sparsity")
    ax.legend(fontsize=5, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small layouts (CPU smoke run)")
    parser.add_argument("--heads", type=int, default=4, help="heads per planted type (default 4)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    layouts = SMALL_LAYOUTS if args.small else REAL_LAYOUTS
    env = environment()
    out_dir = args.out or Path(__file__).parent / "results" / gpu_slug(env.get("gpu", "cpu"))
    records = []
    cases = [(lay, cfg, pl) for lay in layouts for cfg in CONFIGS for pl in PLANTED]
    for seed, (layout_name, config_name, planted_name) in enumerate(tqdm(cases, desc="fidelity", unit="case")):
        layout, head_dim = layouts[layout_name]
        config = RainFusionConfig(**CONFIGS[config_name])
        result = run_case(layout, head_dim, config, PLANTED[planted_name], args.heads, device, dtype, seed)
        records.append({"config": config_name, "layout": layout_name, "planted": planted_name, **result})
    summary = []
    for config_name in CONFIGS:
        rows = [r for r in records if r["config"] == config_name]
        accuracy = [r["accuracy"] for r in rows if not math.isnan(r["accuracy"])] or [float("nan")]
        gaps = [
            abs(r["recall_estimated"] - r["recall_exact_of_estimated"])
            for r in rows
            if not math.isnan(r["recall_estimated"])
        ]
        summary.append(
            {
                "config": config_name,
                "accuracy (planted types)": sum(accuracy) / len(accuracy),
                "mean abs(est - exact) recall": sum(gaps) / len(gaps) if gaps else float("nan"),
                "mean rel_l2": sum(r["rel_l2"] for r in rows) / len(rows),
                "mean sparsity": sum(r["sparsity"] for r in rows) / len(rows),
            }
        )
    columns = ["config", "layout", "planted", "accuracy", "recall_estimated", "recall_exact", "rel_l2", "sparsity"]
    markdown = "\n\n".join(
        [
            "# ARM fidelity on planted heads",
            f"env: {env}",
            f"{args.heads} heads per planted type, {'bf16 on ' + env.get('gpu', '') if cuda else 'fp32 on CPU'}; "
            "recall_estimated: the ARM's sampled recall of the chosen mask (spatial/temporal heads); "
            "recall_exact: softmax mass kept by the chosen mask over all video query rows; sparsity: share "
            "of the scores of video query rows skipped. v2 has no ARM (accuracy and estimated recall: -).",
            markdown_table(summary, list(summary[0])),
            markdown_table(records, columns),
        ]
    )
    write_results(out_dir, "fidelity", env, records, markdown + "\n")
    plot(records, out_dir / "fidelity.png")
    print(markdown_table(summary, list(summary[0])))


if __name__ == "__main__":
    main()
