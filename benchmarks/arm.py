"""Cost of the ARM next to dense attention at the real shapes (GPU only).

Times ``rf_compile.ops.arm.decide`` (both samples, all bandwidths, the decision) with the Triton
recall kernel and with the PyTorch path, next to the best dense SDPA backend of the same call.
Writes ``arm.json`` / ``arm.md`` under ``benchmarks/results/<gpu>/``.

    python benchmarks/arm.py
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from utils import do_bench, do_bench_graph, environment, gpu_slug, markdown_table, write_results

from rf_compile import RainFusionConfig, VideoLayout
from rf_compile.ops import arm

SHAPES = {
    "CogVideoX-5B": (VideoLayout(13, 30, 45, prefix=226), 48, 64),
    "HunyuanVideo": (VideoLayout(32, 30, 40, suffix=256), 24, 128),
    "Wan2.1-14B": (VideoLayout(21, 30, 52), 40, 128),
}
DENSE_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def best_dense_ms(q, k, v) -> float:
    times = []
    for backend in DENSE_BACKENDS.values():
        with sdpa_kernel(backend):
            try:
                times.append(do_bench(lambda: F.scaled_dot_product_attention(q, k, v))["ms"])
            except RuntimeError:
                continue
    return min(times)


def time_arm(q, k, layout: VideoLayout, config: RainFusionConfig, use_triton: bool) -> tuple[float, float]:
    """(wall ms of one call, device ms of one call replayed from a CUDA graph)."""
    saved = arm._use_triton
    arm._use_triton = lambda tensor: use_triton
    try:
        fn = functools.partial(arm.decide, q, k, layout, config)
        return do_bench(fn)["ms"], do_bench_graph(fn)
    finally:
        arm._use_triton = saved


def query_rows(layout: VideoLayout, config: RainFusionConfig) -> str:
    """Query rows the ARM takes of its temporal / spatial sample."""
    omega = config.sample_stride or layout.frames
    counts = layout.frame_tokens, len(range(0, layout.video_tokens, omega))
    return "/".join(str(-(-n // arm.row_stride(n, config.arm_query_rows))) for n in counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="batch sizes (2 = CFG)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--query-rows", type=lambda s: None if s == "none" else int(s),
                        default=RainFusionConfig.arm_query_rows,
                        help="arm_query_rows: most query rows per sample, or 'none' for every row")  # fmt: skip
    args = parser.parse_args()
    assert torch.cuda.is_available(), "the ARM benchmark needs a CUDA GPU"
    env = environment()
    out_dir = args.out or Path(__file__).parent / "results" / gpu_slug(env["gpu"])
    records = []
    for model, (layout, heads, head_dim) in SHAPES.items():
        for batch in args.batch:
            q, k, v = (
                torch.randn(batch, heads, layout.seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
                for _ in range(3)
            )
            dense_ms = best_dense_ms(q, k, v)
            for mode in ("v1", "v1+"):
                config = RainFusionConfig(mode=mode, arm_query_rows=args.query_rows)
                triton_ms, triton_gpu_ms = time_arm(q, k, layout, config, use_triton=True)
                torch_ms, torch_gpu_ms = time_arm(q, k, layout, config, use_triton=False)
                records.append(
                    {
                        "model": model,
                        "batch": batch,
                        "mode": mode,
                        "query_rows": query_rows(layout, config),
                        "arm_ms": triton_ms,
                        "arm_gpu_ms": triton_gpu_ms,
                        "arm_torch_ms": torch_ms,
                        "arm_torch_gpu_ms": torch_gpu_ms,
                        "dense_ms": dense_ms,
                        "ratio": triton_ms / dense_ms,
                        "ratio_gpu": triton_gpu_ms / dense_ms,
                        "ratio_torch_gpu": torch_gpu_ms / dense_ms,
                    }
                )
    columns = ["model", "batch", "mode", "query_rows", "arm_ms", "arm_gpu_ms", "arm_torch_gpu_ms", "dense_ms", "ratio",
               "ratio_gpu", "ratio_torch_gpu"]
    table = markdown_table(records, columns)
    markdown = (
        f"# ARM cost vs best dense SDPA\n\nenv: {env}\n\narm_ms: wall time of one call (do_bench, includes the "
        "host's launch time of its kernels); arm_gpu_ms: device time, replayed from a CUDA graph (what "
        "the ARM adds inside a model, where the host runs ahead of the device); query_rows: query rows of the "
        "temporal / spatial sample (`arm_query_rows`; every key is used). ratio = arm / dense "
        f"(target <= 0.005)\n\n{table}\n"
    )
    write_results(out_dir, "arm", env, records, markdown)
    print(table)


if __name__ == "__main__":
    main()
