"""Repeat the block-sparse kernel many times per launch configuration and count wrong outputs.

A warp-specialised loop that races shows up as an output that is sometimes non-finite or far from
the same call in ``loop="split"`` (one launch, never specialised). Each configuration of the
first ``two_pass`` launch is forced in turn (``block_sparse._FORCED_CONFIG``), for bf16, fp8 and int8,
at CogVideoX's head dim 64 and Wan's 128, on fresh random inputs every repetition. Under Triton's
interpreter (``TRITON_INTERPRET=1``, case ``tiny``) it checks on CPU that ``two_pass`` equals ``split``.

    python benchmarks/stress_two_pass.py --repeats 30 --out benchmarks/results/<gpu>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.utils import config_name, environment, gpu_slug, markdown_table, write_results  # noqa: E402
from rf_compile.config import RainFusionConfig  # noqa: E402
from rf_compile.kernels import block_sparse, sparse_config  # noqa: E402
from rf_compile.layout import VideoLayout  # noqa: E402
from rf_compile.plan import build_plan_table, variants_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not sparse_config.INTERPRET else "cpu"
CASES = {  # name: (layout, heads, head dim)
    "tiny": (VideoLayout(2, 8, 8, prefix=7), 2, 64),  # for the interpreter
    "cogvideox_small": (VideoLayout(7, 20, 30, prefix=226), 6, 64),
    "wan_480p": (VideoLayout(21, 30, 52), 24, 128),
}


def stress(name: str, precision: str, config, repeats: int) -> dict:
    layout, heads, head_dim = CASES[name]
    table = build_plan_table(layout, variants_for(RainFusionConfig(mode="v1+")), DEVICE)
    ids = torch.arange(heads) % table.num_plans
    voh = torch.stack([ids, ids.flip(0)]).to(torch.int32).to(DEVICE)
    record = dict(case=name, head_dim=head_dim, heads=heads, precision=precision, config=config_name(config))
    nonfinite_runs, worst = 0, 0.0
    try:
        for _ in range(repeats):
            q, k, v = (torch.randn(2, heads, layout.seq_len, head_dim, device=DEVICE, dtype=torch.bfloat16)
                       for _ in range(3))  # fmt: skip
            block_sparse._FORCED_CONFIG = None
            ref = block_sparse.block_sparse_attention(q, k, v, table, voh, loads="tma", loop="split",
                                                      precision=precision)  # fmt: skip
            block_sparse._FORCED_CONFIG = config
            out = block_sparse.block_sparse_attention(q, k, v, table, voh, loads="tma", loop="two_pass",
                                                      precision=precision)  # fmt: skip
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            if not torch.isfinite(out).all():
                nonfinite_runs += 1
                continue
            worst = max(worst, float((out.float() - ref.float()).norm() / ref.float().norm()))
    except OutOfResources as error:  # the autotuner skips such a configuration; so does the count
        return dict(record, repeats=0, nonfinite_runs=None, worst_rel_vs_split=None, note=str(error))
    finally:
        block_sparse._FORCED_CONFIG = None
    return dict(record, repeats=repeats, nonfinite_runs=nonfinite_runs, worst_rel_vs_split=worst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cases", nargs="+", default=["cogvideox_small", "wan_480p"], choices=list(CASES))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8", "int8"], choices=["bf16", "fp8", "int8"])
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<gpu>")
    parser.add_argument("--stem", default="stress_two_pass")
    args = parser.parse_args()
    if not sparse_config.tma_runs():
        raise SystemExit("stress_two_pass.py needs a Hopper GPU (TMA loads, warp specialisation) or "
                         "TRITON_INTERPRET=1 (the interpreter emulates TMA; nothing is specialised there)")
    env = environment()
    out = args.out or Path(__file__).resolve().parent / "results" / gpu_slug(str(env.get("gpu")))
    records = []
    for name in args.cases:
        head_dim = CASES[name][2]
        configs = sparse_config.prune_configs(list(sparse_config.CONFIGS),
                                              {"HEAD_DIM": head_dim, "BLOCK_N": 128, "USE_TMA": True, "LOOP": 2})
        for precision in args.precisions:
            for config in configs:
                records.append(stress(name, precision, config, args.repeats))
                print(records[-1], flush=True)
    columns = ["case", "head_dim", "heads", "precision", "config", "repeats", "nonfinite_runs", "worst_rel_vs_split",
               "note"]
    markdown = (f"# two_pass launch configurations under repetition ({env.get('gpu')})\n\n"
                f"torch {env['torch']}, triton {env['triton']}\n\nCommand: `{env['command']}`\n\n"
                "Each row: `repeats` fresh random inputs, the first launch forced to `config`; `nonfinite_runs`: "
                "outputs with a NaN or inf; `worst_rel_vs_split`: largest relative L2 distance of the finite ones "
                "to the same call with loop='split'.\n\n" + markdown_table(records, columns) + "\n")
    write_results(out, args.stem, env, records, markdown)


if __name__ == "__main__":
    main()
