"""Where a block-sparse program's time goes: kernel time against key blocks walked, on synthetic plans.

Every query block walks exactly ``k`` key blocks (a window around its own, all whole, none ragged:
the unmasked loop alone), or ``k`` blocks of which ``j`` take the element mask. Per launch
configuration (forced, not autotuned, so that every ``k`` runs the same code), a least-squares line
``time = a + b * k`` over ``k >= 1`` splits a program's fixed cost (``a``: launch, Q load, pipeline
fill, epilogue) from the cost of a block (``b``); both are given in units of cuDNN's dense time per
key block (dense ms / key blocks), the units of NOTES.md's fit of the attention benchmark. ``k = 0``
times an empty program (launch, Q load, store). ``--block-m 64`` halves the query tile: twice the
programs, each with half the rows, over the same key tiles.

    PYTHONPATH=. python benchmarks/fixed_cost.py --shapes CogVideoX-5B Wan2.1-14B --block-m 128 64

``--profile K ...`` times nothing: it runs each ``K`` twice under one configuration (``--config``), for a
profiler to read (``ncu --clock-control none -k regex:block_sparse_fwd ...``).

Writes ``<out>/<gpu-slug>/<stem>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.attention import SHAPES  # noqa: E402
from benchmarks.utils import config_name, do_bench, environment, gpu_slug, markdown_table, write_results  # noqa: E402
from rf_compile.kernels import block_sparse  # noqa: E402
from rf_compile.kernels.sparse_config import gpu_configs, prune_configs  # noqa: E402
from rf_compile.layout import VideoLayout  # noqa: E402
from rf_compile.plan import BLOCK_N, PlanTable  # noqa: E402

KS = (0, 1, 2, 4, 8, 16, 32, 64)
MASKED = (1, 2, 4)  # masked blocks among MASKED_OF walked
MASKED_OF = 8


def window_table(layout: VideoLayout, walked: int, masked: int, block_m: int, device) -> PlanTable:
    """One identity-order plan in which every query block walks ``walked`` consecutive whole key blocks
    around its own (never the ragged last one), the last ``masked`` of them flagged for the element mask."""
    N = layout.seq_len
    mq, mk = triton.cdiv(N, block_m), triton.cdiv(N, BLOCK_N)
    whole = N // BLOCK_N
    if walked > whole or masked > walked:
        raise ValueError(f"{walked} blocks ({masked} masked) do not fit {whole} whole key blocks")
    centre = (torch.arange(mq) * block_m + block_m // 2) // BLOCK_N
    start = (centre - walked // 2).clamp(0, whole - walked)
    kv_indices = torch.zeros(1, mq, mk, dtype=torch.int32)
    kv_indices[0, :, :walked] = start[:, None] + torch.arange(walked)
    block_full = torch.zeros(1, mq, mk, dtype=torch.bool)
    block_full[0, :, : walked - masked] = True
    one = torch.ones(1, dtype=torch.int32)
    return PlanTable(
        layout=layout, variants=(), orders=torch.arange(N, dtype=torch.int32)[None].to(device),
        q_order=(0 * one).to(device), kv_order=(0 * one).to(device), band=(-one).to(device),
        kv_valid=(N * one).to(device), kv_num_blocks=torch.full((1, mq), walked, dtype=torch.int32, device=device),
        kv_indices=kv_indices.to(device), block_full=block_full.to(device), block_m=block_m, block_n=BLOCK_N,
    )


def window_error(q, k, v, table: PlanTable, out: torch.Tensor, rows: torch.Tensor) -> float:
    """Relative error of ``out`` at query ``rows`` against SDPA (float64) over the keys of their plan row."""
    keys = torch.zeros(len(rows), q.shape[2], dtype=torch.bool, device=q.device)
    for i, r in enumerate(rows.tolist()):
        m = r // table.block_m
        for kb in table.kv_indices[0, m, : int(table.kv_num_blocks[0, m])].tolist():
            keys[i, kb * BLOCK_N:(kb + 1) * BLOCK_N] = True
    ref = F.scaled_dot_product_attention(q[:, :, rows].double(), k.double(), v.double(), attn_mask=keys)
    return ((out[:, :, rows].double() - ref).norm() / ref.norm()).item()


def split_configs(head_dim: int, names: list[str] | None = None) -> list[triton.Config]:
    """The launch configurations the autotuner may keep for the ``split`` loop on TMA loads, whole key tiles;
    ``names`` (``--configs``): only those, and an error naming the others where none of them is one."""
    named = dict(HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, USE_TMA=True, LOOP=0, HAS_BIAS=False)
    configs = [c for c in prune_configs(gpu_configs(False), named) if c.kwargs["SPLIT_N"] == 1]
    chosen = [c for c in configs if config_name(c) in names] if names else configs
    if not chosen:
        raise SystemExit(f"--configs {names}: none is a launch configuration at d={head_dim}; these are: "
                         f"{[config_name(c) for c in configs]}")
    return chosen


def fit(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least-squares ``ms = a + b * k``: (a, b, largest residual)."""
    ks = torch.tensor([p[0] for p in points], dtype=torch.float64)
    ms = torch.tensor([p[1] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(ks), ks], 1)
    a, b = torch.linalg.lstsq(design, ms[:, None]).solution[:, 0].tolist()
    return a, b, float((design @ torch.tensor([a, b], dtype=torch.float64) - ms).abs().max())


def bench_shape(model: str, block_m: int, args, records: list[dict], summary: list[dict], log) -> None:
    heads, D, layout = SHAPES[model]
    N = layout.seq_len
    q, k, v = (torch.randn(1, heads, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), rep_ms=args.rep_ms)["ms"]
    unit = dense / triton.cdiv(N, BLOCK_N)  # cuDNN's time per key block of every query row
    base = dict(model=model, heads=heads, head_dim=D, seq_len=N, block_m=block_m, dense_ms=dense)
    log(f"{model} dense (default SDPA) {dense:.3f} ms, {unit * 1e3:.2f} us a key block")
    voh = torch.zeros(1, heads, dtype=torch.int32, device="cuda")
    rows = torch.randperm(N, device="cuda")[:16]
    configs = split_configs(D, args.configs)
    cases = [(n, 0) for n in KS] + [(MASKED_OF, j) for j in MASKED]
    for config, descriptors in ((c, d) for c in configs for d in args.descriptors):
        name, times = config_name(config), {}
        block_sparse._FORCED_CONFIG = config
        try:
            for walked, masked in cases:
                if walked > layout.seq_len // BLOCK_N:
                    continue
                table = window_table(layout, walked, masked, block_m, "cuda")

                def run(table=table, descriptors=descriptors):
                    return block_sparse.block_sparse_attention(q, k, v, table, voh, loads=args.loads, loop="split",
                                                               descriptors=descriptors)

                out = run()
                err = window_error(q, k, v, table, out, rows) if walked else float("nan")
                t = do_bench(run, rep_ms=args.rep_ms)
                times[walked, masked] = t["ms"]
                records.append(dict(base, config=name, descriptors=descriptors, walked=walked, masked=masked,
                                    rel_err=err, **t))
                log(f"{model} m{block_m} {name} {descriptors} k={walked} masked={masked}: {t['ms']:.4f} ms "
                    f"err {err:.1e}")
        except Exception as exc:  # noqa: BLE001 - a configuration that does not build at this tile is reported
            log(f"{model} m{block_m} {name}: failed {exc!r}")
            continue
        finally:
            block_sparse._FORCED_CONFIG = None
        a, b, worst = fit([(n, t) for (n, j), t in times.items() if n and not j])
        extra = sum((times[MASKED_OF, j] - times[MASKED_OF, 0]) / j for j in MASKED) / len(MASKED)
        summary.append(dict(base, config=name, descriptors=descriptors, empty_blocks=times[0, 0] / unit,
                            a_blocks=a / unit, b_x_cudnn=b / unit,
                            masked_extra_x_cudnn=extra / unit, worst_residual_blocks=worst / unit,
                            fixed_share_at_0_2=a / (a + b * 0.2 * triton.cdiv(N, BLOCK_N))))


def profile(model: str, block_m: int, walked: list[int], config_text: str) -> None:
    """Run the plans of ``walked`` blocks twice each, forced to one configuration, for a profiler."""
    heads, D, layout = SHAPES[model]
    q, k, v = (torch.randn(1, heads, layout.seq_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    voh = torch.zeros(1, heads, dtype=torch.int32, device="cuda")
    configs = {config_name(c): c for c in split_configs(D)}
    if config_text not in configs:
        raise SystemExit(f"--config {config_text!r} is not a launch configuration at d={D}; one of {sorted(configs)}")
    block_sparse._FORCED_CONFIG = configs[config_text]
    for n in walked:
        table = window_table(layout, n, 0, block_m, "cuda")
        for _ in range(2):
            block_sparse.block_sparse_attention(q, k, v, table, voh, loads="tma", loop="split")
        torch.cuda.synchronize()
        print(f"{model} m{block_m} {config_text} k={n}: ran twice")
    block_sparse._FORCED_CONFIG = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["CogVideoX-5B", "Wan2.1-14B"], choices=list(SHAPES))
    parser.add_argument("--block-m", nargs="*", type=int, default=[128, 64], help="query tile rows to compare")
    parser.add_argument("--loads", default="tma", choices=["tma", "gather"])
    parser.add_argument("--descriptors", nargs="+", default=["auto"], choices=["device", "host", "auto"],
                        help="who makes the TMA descriptors (the kernel's option), each timed in turn")
    parser.add_argument("--configs", nargs="*", default=[],
                        help="only these launch configurations (e.g. w4/s3/ws0/n1); default: every one kept")
    parser.add_argument("--rep-ms", type=float, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--stem", default="fixed_cost", help="result file name (without extension)")
    parser.add_argument("--profile", nargs="*", type=int, default=[], metavar="K",
                        help="only run these key-block counts twice each (first shape and block_m), for a profiler")
    parser.add_argument("--config", default="w4/s3/ws0/n1", help="the configuration --profile forces")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.profile:
        profile(args.shapes[0], args.block_m[0], args.profile, args.config)
        return
    env = environment()
    records, summary = [], []
    for model in args.shapes:
        for block_m in args.block_m:
            bench_shape(model, block_m, args, records, summary, print)
            md = (f"# Fixed cost of a block-sparse program ({env.get('gpu')})\n\ntorch {env['torch']}, triton "
                  f"{env['triton']}\n\nCommand: `{env['command']}`\n\nUnits: cuDNN's dense time per key block. "
                  "`a`, `b`: least-squares `ms = a + b * k` over k >= 1 whole key blocks a query block; `empty`: k = "
                  f"0; `masked_extra`: the extra time of a block taking the element mask (of {MASKED_OF}).\n\n"
                  + markdown_table(summary, ["model", "block_m", "config", "descriptors", "dense_ms", "empty_blocks",
                                             "a_blocks", "b_x_cudnn", "masked_extra_x_cudnn", "worst_residual_blocks",
                                             "fixed_share_at_0_2"]) + "\n")
            write_results(args.out / gpu_slug(str(env.get("gpu", "cpu"))), args.stem, env,
                          [dict(r, kind="time") for r in records] + [dict(s, kind="fit") for s in summary], md)
    print(md)


if __name__ == "__main__":
    main()
