"""Every launch configuration of the block-sparse kernel, forced one at a time, under each loop shape.

The autotuner reports only its winner. To see which configurations pay (warp specialisation
above all, which wins in the single-loop Triton ceiling kernel, ``../shared/anchors/triton_ceiling.md``),
this times each configuration the pruner keeps with ``loop="split"`` (masked blocks in a first loop,
the unmasked ones in a second), ``loop="masked"`` (one loop, element mask on every block) and
``loop="two_pass"`` (the configuration forced on the launch of the unmasked blocks, which may be
warp-specialised; the masked launch autotuned), TMA loads, against cuDNN dense attention of the
same shape: efficiency = cudnn_ms * block density / ms. GPU only.

    python benchmarks/kernel_configs.py --shapes HunyuanVideo Wan2.1-14B --patterns textural density0.3
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.attention import PATTERNS, SHAPES, pattern_plan  # noqa: E402
from benchmarks.plan_stats import pattern_stats  # noqa: E402
from benchmarks.utils import config_name, do_bench, environment, gpu_slug, markdown_table, write_results  # noqa: E402
from rf_compile.kernels import block_sparse, sparse_config  # noqa: E402


def bench_pattern(model: str, pattern: str, rep_ms: float) -> list[dict]:
    """One record per (loop, configuration) of one shape and pattern."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, D, layout = SHAPES[model]
    q, k, v = (torch.randn(1, heads, layout.seq_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), rep_ms=rep_ms)["ms"]
    table, voh = pattern_plan(pattern, layout, heads)
    density = pattern_stats(model, pattern, masked_cost=1.0)["block_density"]
    records = []
    # "two_pass": the configuration is forced on the unmasked launch (the only one that may be
    # warp-specialised); the masked launch keeps the autotuner's choice.
    for loop, loop_pass in (("split", 0), ("masked", 1), ("two_pass", 2)):
        args = {"HEAD_DIM": D, "BLOCK_N": table.block_n, "USE_TMA": True, "LOOP": loop_pass}
        for config in sparse_config.prune_configs(sparse_config.CONFIGS, args):
            block_sparse._FORCED_CONFIG = config
            try:
                run = functools.partial(block_sparse.block_sparse_attention, q, k, v, table, voh,
                                        loads="tma", loop=loop)  # fmt: skip
                ms = do_bench(run, rep_ms=rep_ms)["ms"]
            except Exception as error:  # out of shared memory and the like: say so, go on
                ms, note = float("nan"), f"{type(error).__name__}: {str(error)[:80]}"
            else:
                note = ""
            finally:
                block_sparse._FORCED_CONFIG = None
            records.append(dict(model=model, pattern=pattern, loop=loop, config=config_name(config),
                                block_density=density, cudnn_ms=cudnn_ms, ms=ms,
                                efficiency=cudnn_ms * density / ms, note=note))  # fmt: skip
            print(f"{model:14s} {pattern:10s} {loop:8s} {config_name(config):16s} {ms:8.3f} ms "
                  f"eff {cudnn_ms * density / ms:.3f} {note}", flush=True)  # fmt: skip
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["HunyuanVideo", "Wan2.1-14B"], choices=list(SHAPES))
    parser.add_argument("--patterns", nargs="+", default=["textural", "density0.3"], choices=list(PATTERNS))
    parser.add_argument("--rep-ms", type=float, default=50)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<gpu>")
    parser.add_argument("--stem", default="kernel_configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_configs.py times the Triton kernel on a CUDA GPU; none is visible here")
    records = [r for m in args.shapes for p in args.patterns for r in bench_pattern(m, p, args.rep_ms)]
    columns = ["model", "pattern", "loop", "config", "block_density", "cudnn_ms", "ms", "efficiency", "note"]
    env = environment()
    markdown = (
        f"# Block-sparse kernel, every configuration forced ({env.get('gpu')})\n\n"
        f"torch {env['torch']}, triton {env['triton']}. Command: `{env['command']}`\n\n"
        "config: warps / stages / warp specialisation / key sub-tiles; TMA loads; B = 1, bf16.\n\n"
        f"{markdown_table(records, columns)}\n"
    )
    out = args.out or Path(__file__).parent / "results" / gpu_slug(torch.cuda.get_device_name())
    write_results(out, args.stem, env, records, markdown)


if __name__ == "__main__":
    main()
