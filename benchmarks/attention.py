"""Attention benchmark: RainFusion block-sparse kernel vs dense SDPA backends and FlexAttention.

For each model shape (B=1, bf16, contiguous (B, H, N, D) inputs) it times dense SDPA per backend
(flash, cuDNN, efficient), FlexAttention compiled with exactly our block plan (BlockMask from the
same kv_num_blocks / kv_indices, full blocks split out, a mask_mod for partial blocks; inputs
pre-permuted outside the timed region, output left permuted: both favour Flex), and ours
(``rf_compile.kernels.block_sparse``, autotuned, each load path, and ``loop="masked"`` to price the
element mask), for head patterns
spatial / temporal / textural at the v1 default, a 40/40/20 mix, and spatial bands at block
densities near 0.5, 0.3, 0.2. Ours and Flex are checked once per pattern against a float64
reference on random query rows.

    PYTHONPATH=. python benchmarks/attention.py --out benchmarks/results

Writes ``<out>/<gpu-slug>/attention.json`` and ``attention.md``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.utils import (  # noqa: E402
    config_name,
    do_bench,
    do_bench_graph,
    environment,
    gpu_slug,
    markdown_table,
    reference_rows,
    rel_err,
    write_results,
)
from rf_compile.config import RainFusionConfig  # noqa: E402
from rf_compile.layout import VideoLayout  # noqa: E402
from rf_compile.plan import Pattern, Variant, build_plan_table, variants_for  # noqa: E402

SHAPES = {
    "CogVideoX-5B": (48, 64, VideoLayout(13, 30, 45, prefix=226)),  # N = 17776
    "HunyuanVideo": (24, 128, VideoLayout(32, 30, 40, suffix=256)),  # N = 38656
    "Wan2.1-14B": (40, 128, VideoLayout(21, 30, 52)),  # N = 32760
    "Wan2.1-14B-720p": (40, 128, VideoLayout(21, 45, 80)),  # N = 75600 (M = 591 blocks); not run by default
    # The published 1280x720, 129 frames (the e2e full config): N = 119056 (M = 931); not run by default
    "HunyuanVideo-720p": (24, 128, VideoLayout(33, 45, 80, suffix=256)),
}
DEFAULT_SHAPES = ("CogVideoX-5B", "HunyuanVideo", "Wan2.1-14B")
PATTERNS = ("spatial", "temporal", "textural", "mix", "density0.5", "density0.3", "density0.2")
V2_SPARSITIES = (0.7, 0.8, 0.9)  # RainFusion 2.0 key-block sparsity (density ~0.3 / 0.2 / 0.1 + forced blocks)
V1 = variants_for(RainFusionConfig())


def spatial_bandwidth_for(layout: VideoLayout, target: float) -> float:
    """Bandwidth whose spatial block density is closest to ``target`` (bisection)."""
    lo, hi = 1e-4, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        d = float(build_plan_table(layout, (Variant(Pattern.SPATIAL, mid),), "cpu").density()[0])
        lo, hi = (mid, hi) if d < target else (lo, mid)
    return (lo + hi) / 2


def pattern_plan(name: str, layout: VideoLayout, heads: int, device="cuda"):
    """(table, variant_of_head int32 [1, H]) of a benchmark pattern."""
    if name.startswith("density"):
        bandwidth = spatial_bandwidth_for(layout, float(name[len("density"):]))
        table = build_plan_table(layout, (Variant(Pattern.SPATIAL, bandwidth),), device)
        return table, torch.zeros(1, heads, dtype=torch.int32, device=device)
    table = build_plan_table(layout, V1, device)
    if name == "mix":  # 40% spatial, 40% temporal, 20% textural
        cycle = [Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.SPATIAL, Pattern.TEMPORAL, Pattern.TEXTURAL]
        ids = [int(cycle[h % 5]) for h in range(heads)]
    else:
        ids = [int(Pattern[name.upper()])] * heads
    return table, torch.tensor([ids], dtype=torch.int32, device=device)


# -- FlexAttention with our plan --------------------------------------------------------------


def _lists(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., Mk] block mask -> (kv_num_blocks, kv_indices) as FlexAttention wants."""
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return num.contiguous(), idx.contiguous()


class FlexRunner:
    """FlexAttention over inputs pre-permuted per head, with a BlockMask built from our plan."""

    def __init__(self, layout: VideoLayout, heads: int, device="cuda", compiled=True):
        from torch.nn.attention.flex_attention import flex_attention

        self.layout, self.N = layout, layout.seq_len
        # Per-head rule parameters, updated in place per pattern so the compiled kernel is reused.
        self.band = torch.zeros(1, heads, dtype=torch.int32, device=device)
        self.valid = torch.zeros(1, heads, dtype=torch.int32, device=device)
        prefix, video_end = layout.prefix, layout.prefix + layout.video_tokens
        band, valid = self.band, self.valid

        def mask_mod(b, h, q_idx, kv_idx):
            bw, kv_valid = band[b, h], valid[b, h]
            text_q = (q_idx < prefix) | (q_idx >= video_end)
            text_k = (kv_idx < prefix) | (kv_idx >= video_end)
            near = (q_idx - kv_idx).abs() <= bw
            return text_q | ((kv_idx < kv_valid) & ((bw < 0) | text_k | near))

        self.mask_mod = mask_mod
        self.flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def prepare(self, table, voh, q, k, v):
        from torch.nn.attention.flex_attention import BlockMask

        p = voh.long()
        self.band.copy_(table.band[p])
        self.valid.copy_(table.kv_valid[p])
        P, Mq, Mk = table.kv_indices.shape
        device = table.kv_indices.device
        live = torch.arange(Mk, device=device) < table.kv_num_blocks[..., None]
        idx = torch.where(live, table.kv_indices.long(), Mk)
        full = torch.zeros(P, Mq, Mk + 1, dtype=torch.bool, device=device)
        full.scatter_(-1, idx, table.block_full & live)
        full = full[..., :Mk]
        partial = table.to_dense() & ~full
        num, ind = _lists(partial[p])
        fnum, find = _lists(full[p])
        self.block_mask = BlockMask.from_kv_blocks(num, ind, fnum, find, BLOCK_SIZE=(table.block_m, table.block_n),
                                                   mask_mod=self.mask_mod, seq_lengths=(self.N, self.N))
        D = q.shape[-1]
        q_idx = table.orders[table.q_order[p]].long()[..., None].expand(-1, -1, -1, D)
        kv_idx = table.orders[table.kv_order[p]].long()[..., None].expand(-1, -1, -1, D)
        self.q, self.k, self.v = q.gather(2, q_idx), k.gather(2, kv_idx), v.gather(2, kv_idx)
        self.q_order = table.orders[table.q_order[p]].long()

    def __call__(self, kernel_options):
        return self.flex(self.q, self.k, self.v, block_mask=self.block_mask, kernel_options=kernel_options)

    def unpermute(self, out):
        res = torch.empty_like(out)
        return res.scatter_(2, self.q_order[..., None].expand_as(out), out)


# Run 1 (NOTES.md) also tried 64/64/4/3 at d=64 and 128/64/8/2 at d=128: 5-14% slower than these.
FLEX_OPTIONS = {
    64: [{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}],
    128: [{}],
}
# (loads, loop) forms of ours. Runs 1-2 (NOTES.md) measured the loop forms since removed from the
# kernel: a run-time branch per block 15-50% and the unmasked loop first 0-22% slower than "split".
# "two_pass" puts the unmasked blocks in a launch of their own, the one Triton warp-specialises.
VARIANTS = [("tma", "two_pass"), ("tma", "split"), ("tma", "masked"), ("gather", "split")]


# -- main -------------------------------------------------------------------------------------


def bench_shape(model, heads, D, layout, args, records, log):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rf_compile.kernels import block_sparse

    N = layout.seq_len
    base = dict(model=model, heads=heads, head_dim=D, seq_len=N, dtype="bf16", layout=layout.describe())
    q, k, v = (torch.randn(1, heads, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = {}
    for method, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                            ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                t = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), rep_ms=args.rep_ms)
            dense[method] = t["ms"]
            records.append(dict(base, method=method, pattern="dense", density=1.0, **t))
            log(f"{model} {method}: {t['ms']:.3f} ms")
        except Exception as exc:  # noqa: BLE001
            log(f"{model} {method}: failed {exc!r}")
    best_dense = min(dense.values())
    if args.v2:
        bench_v2(model, layout, q, k, v, best_dense, base, args, records, log)
    flex = FlexRunner(layout, heads) if not args.no_flex else None
    rows = torch.randperm(N, device="cuda")[: args.check_rows]
    for pattern in args.patterns:
        table, voh = pattern_plan(pattern, layout, heads)
        density = float(table.density()[voh.long()].mean())
        ref = reference_rows(q, k, v, table, voh, rows)
        common = dict(base, pattern=pattern, density=density, best_dense_ms=best_dense)
        for loads, loop, *rest in args.variants:
            name = "/".join((loads, loop, *rest))
            try:
                fn = functools.partial(block_sparse.block_sparse_attention, q, k, v, table, voh, loads=loads, loop=loop,
                                       **dict(zip(("schedule", "descriptors"), rest)))
                t0 = time.time()
                out = fn()
                torch.cuda.synchronize()
                first_s = time.time() - t0
                err = rel_err(out[:, :, rows], ref)
                t = do_bench(fn, rep_ms=args.rep_ms)
                cfg = _tuned_configs(block_sparse_kernel(), D, N)
                records.append(dict(common, method="rainfusion", variant=name, rel_err=err, config=cfg,
                                    first_call_s=first_s, efficiency=best_dense * density / t["ms"], **t))
                log(f"{model} {pattern} d={density:.3f} rainfusion {name}: {t['ms']:.3f} ms "
                    f"eff {best_dense * density / t['ms']:.3f} err {err:.1e} cfg {cfg}")
                for precision in args.precisions:
                    if loads == "tma":
                        records.append(bench_8bit(precision, fn, out, t["ms"], rows, ref, common, name, args, log))
            except Exception as exc:  # noqa: BLE001
                log(f"{model} {pattern} rainfusion {name}: failed {exc!r}")
                traceback.print_exc()
        if flex is None:
            continue
        try:
            flex.prepare(table, voh, q, k, v)
        except Exception as exc:  # noqa: BLE001
            log(f"{model} {pattern} flex prepare failed {exc!r}")
            traceback.print_exc()
            continue
        for options in FLEX_OPTIONS[D]:
            try:
                t0 = time.time()
                out = flex(options)
                torch.cuda.synchronize()
                first_s = time.time() - t0
                err = rel_err(flex.unpermute(out)[:, :, rows], ref)
                t = do_bench(lambda options=options: flex(options), rep_ms=args.rep_ms)
                records.append(dict(common, method="flex", variant=str(options or "default"), rel_err=err,
                                    first_call_s=first_s, efficiency=best_dense * density / t["ms"], **t))
                log(f"{model} {pattern} flex {options}: {t['ms']:.3f} ms err {err:.1e} (first {first_s:.1f}s)")
            except Exception as exc:  # noqa: BLE001
                log(f"{model} {pattern} flex {options}: failed {exc!r}")
        del ref


def bench_v2(model, layout, q, k, v, best_dense, base, args, records, log):
    """RainFusion 2.0: block-mean prediction + the same kernel, timed together and apart.

    The prediction is timed as the op runs it (block means + the fused selection kernel), in wall
    time (``predict_ms``) and replayed from a CUDA graph (``predict_gpu_ms``, its share of the best
    dense time: ``predict_share``), and the PyTorch selection path it replaced from a CUDA graph
    (``predict_torch_gpu_ms``).
    """
    from rf_compile.kernels import block_sparse
    from rf_compile.ops import v2
    from rf_compile.ops.attention import v2_plan
    from rf_compile.plan import element_mask

    rows = torch.randperm(layout.seq_len, device="cuda")[: args.check_rows]
    for sparsity, order, descriptors in ((s, o, d) for o in args.v2_orders for s in args.v2 for d in args.descriptors):
        config = RainFusionConfig(mode="v2", sparsity=sparsity, order=order)
        pattern = (f"v2 s={sparsity}" + ("" if order == "tiles" else f" {order}")
                   + ("" if descriptors == "auto" else f" {descriptors}"))
        attend = functools.partial(block_sparse.block_sparse_attention, descriptors=descriptors)
        table, voh = v2_plan(q, k, layout, config, None)
        density = float(table.density().mean())
        # Reference on a few query rows: float64 softmax under each head's plan mask.
        masks = torch.stack([element_mask(table, p, rows) for p in range(table.num_plans)]).view(
            *voh.shape, len(rows), -1
        )
        scores = torch.einsum("bhrd,bhnd->bhrn", q[:, :, rows].double(), k.double()) * q.shape[-1] ** -0.5
        ref = torch.softmax(scores.masked_fill(~masks, float("-inf")), -1) @ v.double()
        out = attend(q, k, v, table, voh.int())
        err = rel_err(out[:, :, rows], ref)
        predict = do_bench(lambda config=config: v2_plan(q, k, layout, config, None), rep_ms=args.rep_ms)
        predict_gpu_ms = do_bench_graph(lambda config=config: v2_plan(q, k, layout, config, None))
        predict_torch_gpu_ms = do_bench_graph(lambda config=config: v2.predict_plan(q, k, layout, config, fused=False))
        kernel = do_bench(functools.partial(attend, q, k, v, table, voh.int()), rep_ms=args.rep_ms)
        copies_ms, copy_sweep = _copies(q, k, v, table, voh.int(), args) if order == "tiles" else (0.0, {})
        loops = {f"kernel_{loop}_ms": do_bench(functools.partial(attend, q, k, v, table, voh.int(), loop=loop),
                                               rep_ms=args.rep_ms)["ms"]
                 for loop in ("split", "two_pass")}

        def total(config=config, attend=attend):
            plan, heads = v2_plan(q, k, layout, config, None)
            return attend(q, k, v, plan, heads.int())

        t = do_bench(total, rep_ms=args.rep_ms)
        records.append(dict(base, method="rainfusion", pattern=pattern, variant="v2 predict+kernel", order=order,
                            density=density, best_dense_ms=best_dense, predict_ms=predict["ms"],
                            predict_gpu_ms=predict_gpu_ms, predict_share=predict_gpu_ms / best_dense,
                            predict_torch_gpu_ms=predict_torch_gpu_ms, kernel_ms=kernel["ms"], **loops, rel_err=err,
                            copies_ms=copies_ms, copy_sweep_ms=copy_sweep,
                            efficiency=best_dense * density / kernel["ms"], **t))
        log(f"{model} {pattern} d={density:.3f}: total {t['ms']:.3f} ms (predict {predict['ms']:.3f}, "
            f"kernel {kernel['ms']:.3f}, split {loops['kernel_split_ms']:.3f}, two_pass "
            f"{loops['kernel_two_pass_ms']:.3f}, row copies {copies_ms:.3f} {copy_sweep}) "
            f"{best_dense / t['ms']:.2f}x dense, err {err:.1e}; prediction on the "
            f"device {predict_gpu_ms:.3f} ms = {100 * predict_gpu_ms / best_dense:.2f}% of dense "
            f"(PyTorch selection {predict_torch_gpu_ms:.3f} ms)")


def _copies(q, k, v, table, voh, args) -> tuple[float, dict[str, float]]:
    """ms of the TMA path's row copies (q, k, v into each head's order, the output back) as launched, and at each
    of ``args.copy_launches`` (rows x warps per program, e.g. ``128x8``)."""
    from rf_compile.kernels import block_sparse

    extras, out = block_sparse.plan_extras(table), torch.empty_like(q)

    def copies():
        *_, op = block_sparse.permuted_inputs(q, k, v, out, extras, voh)
        block_sparse.restore_rows(out, op, extras, voh)

    default = block_sparse.COPY_LAUNCH
    swept = {}
    try:
        for rows, warps in args.copy_launches:
            block_sparse.COPY_LAUNCH = (rows, warps)
            swept[f"{rows}x{warps}"] = do_bench(copies, rep_ms=args.rep_ms)["ms"]
    finally:
        block_sparse.COPY_LAUNCH = default
    return do_bench(copies, rep_ms=args.rep_ms)["ms"], swept


def _copy_launch(text: str) -> tuple[int, int]:
    """``ROWSxWARPS`` -> (rows, warps): powers of two, rows 16-1024, warps 1-16."""
    rows, _, warps = text.partition("x")
    try:
        launch = int(rows), int(warps)
    except ValueError:
        launch = (0, 0)
    if not (16 <= launch[0] <= 1024 and 1 <= launch[1] <= 16 and all(n & (n - 1) == 0 for n in launch)):
        raise argparse.ArgumentTypeError(f"{text!r}: give ROWSxWARPS, powers of two, rows 16-1024 and warps 1-16, "
                                         "e.g. 128x8")
    return launch


def bench_8bit(precision: str, bf16_fn, bf16_out, bf16_ms: float, rows, ref, common: dict, name: str, args,
               log) -> dict:
    """The same call with an 8-bit ``precision``: time, speed-up over bf16, and its error against bf16
    (relative L1 and cosine over every output, NaNs counted) and against the float64 reference rows."""
    fn = functools.partial(bf16_fn, precision=precision)
    out = fn()
    torch.cuda.synchronize()
    nonfinite = int((~torch.isfinite(out)).sum())
    diff, base = (out.float() - bf16_out.float()), bf16_out.float()
    rel_l1 = float(diff.abs().sum() / base.abs().sum())
    cosine = float(F.cosine_similarity(out.float().flatten(), base.flatten(), dim=0))
    t = do_bench(fn, rep_ms=args.rep_ms)
    record = dict(common, method="rainfusion", dtype=precision, variant=name, rel_err=rel_err(out[:, :, rows], ref),
                  rel_l1_vs_bf16=rel_l1, cosine_vs_bf16=cosine, nonfinite=nonfinite, speedup_vs_bf16=bf16_ms / t["ms"],
                  config=_tuned_configs(block_sparse_kernel(), out.shape[-1], out.shape[2], precision),
                  efficiency=common["best_dense_ms"] * common["density"] / t["ms"], **t)  # fmt: skip
    log(f"{common['model']} {common['pattern']} rainfusion {name} {precision}: {t['ms']:.3f} ms "
        f"({bf16_ms / t['ms']:.2f}x bf16) rel L1 vs bf16 {rel_l1:.3f} cos {cosine:.5f} err {record['rel_err']:.1e}"
        f" non-finite {nonfinite}")
    return record


def block_sparse_kernel():
    from rf_compile.kernels import sparse_loop

    return sparse_loop.block_sparse_fwd_kernel


def _tuned_configs(kernel, head_dim: int, seq_len: int, precision: str = "bf16") -> str:
    """The autotuner's choice for each kernel pass (``LOOP``) tuned at this head dim, length and
    precision, e.g. ``"2:w4/s2/ws1/n1 3:w8/s3/ws0/n1"`` after loop="two_pass". Keys follow the
    kernel's autotune key: HEAD_DIM, BLOCK_M, BLOCK_N, N_BUCKET, USE_TMA, LOOP, HAS_BIAS, FP8,
    QK_INT8, then argument dtypes."""
    bucket = triton.next_power_of_2(seq_len)
    flags = (precision != "bf16", precision == "int8")
    chosen = {key[5]: config for key, config in getattr(kernel, "cache", {}).items()
              if key[0] == head_dim and key[3] == bucket and (bool(key[7]), bool(key[8])) == flags}  # fmt: skip
    return " ".join(f"{loop}:{config_name(config)}" for loop, config in sorted(chosen.items())) or "none"


def summarize(records: list[dict]) -> str:
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        recs = [r for r in records if r["model"] == model]
        dense = {r["method"]: r["ms"] for r in recs if r["pattern"] == "dense"}
        best_dense = min(dense.values()) if dense else math.nan
        for pattern in dict.fromkeys(r["pattern"] for r in recs if r["pattern"] != "dense"):
            ours = [r for r in recs if r["pattern"] == pattern and r["method"] == "rainfusion"
                    and r.get("dtype", "bf16") == "bf16"]
            flex = [r for r in recs if r["pattern"] == pattern and r["method"] == "flex"]
            if not ours:
                continue
            best = min(ours, key=lambda r: r["ms"])
            flex_ms = min((r["ms"] for r in flex), default=math.nan)
            rows.append(dict(
                model=model, pattern=pattern, density=best["density"], best_dense_ms=best_dense,
                ours_ms=best["ms"], ours_variant=f"{best['variant']} {best.get('config', '')}",
                efficiency=best_dense * best["density"] / best["ms"], speedup_vs_dense=best_dense / best["ms"],
                flex_ms=flex_ms, speedup_vs_flex=flex_ms / best["ms"], rel_err=best.get("rel_err", math.nan),
                predict_ms=best.get("predict_ms", math.nan), predict_gpu_ms=best.get("predict_gpu_ms", math.nan),
                predict_share=best.get("predict_share", math.nan),
                predict_torch_gpu_ms=best.get("predict_torch_gpu_ms", math.nan),
                **{f"{v}_ms": min((r["ms"] for r in ours if r["variant"] == v), default=math.nan)
                   for v in (f"{a}/{b}" for a, b in VARIANTS)},
            ))
    cols = ["model", "pattern", "density", "best_dense_ms", "ours_ms", "efficiency", "speedup_vs_dense", "flex_ms",
            "speedup_vs_flex", "ours_variant", *(f"{a}/{b}_ms" for a, b in VARIANTS), "predict_ms", "predict_gpu_ms",
            "predict_share", "predict_torch_gpu_ms", "rel_err"]
    dense_rows = [dict(model=r["model"], method=r["method"], ms=r["ms"]) for r in records if r["pattern"] == "dense"]
    best_bf16: dict[tuple, float] = {}
    for r in records:
        if r["method"] == "rainfusion" and r.get("dtype", "bf16") == "bf16":
            key = (r["model"], r["pattern"])
            best_bf16[key] = min(best_bf16.get(key, math.inf), r["ms"])
    low_rows = [dict(r, vs_bf16_best=best_bf16.get((r["model"], r["pattern"]), math.nan) / r["ms"])
                for r in records if r.get("dtype", "bf16") != "bf16"]  # fmt: skip
    low = ("\n\n8-bit precisions (`precision`, the `dtype` column) against bf16 (`speedup_vs_bf16`: over bf16 "
           "with the same plan and loop; `vs_bf16_best`: over the fastest bf16 form of the pattern):\n\n"
           + markdown_table(low_rows, ["model", "pattern", "dtype", "variant", "ms", "speedup_vs_bf16",
                                       "vs_bf16_best", "efficiency", "rel_l1_vs_bf16", "cosine_vs_bf16",
                                       "nonfinite", "rel_err", "config"])) if low_rows else ""
    v2_rows = [dict(r, speedup_vs_dense=r["best_dense_ms"] / r["ms"]) for r in records
               if r.get("variant") == "v2 predict+kernel"]
    v2 = ("\n\nRainFusion 2.0 (`ms`: prediction and kernel; `kernel_ms`: the kernel under `loop=\"auto\"`, then "
          "each loop form; `copies_ms`: the row copies inside the kernel's time (tiles order); efficiency of "
          "the auto kernel):\n\n"
          + markdown_table(v2_rows, ["model", "pattern", "density", "ms", "speedup_vs_dense", "predict_gpu_ms",
                                     "kernel_ms", "kernel_split_ms", "kernel_two_pass_ms", "copies_ms", "efficiency"])
          ) if v2_rows else ""
    form_rows = [r for r in records if r["method"] == "rainfusion" and r.get("dtype", "bf16") == "bf16"
                 and r.get("variant") != "v2 predict+kernel"]
    forms = ("\n\nEvery bf16 form of ours (`variant`: loads/loop[/schedule/descriptors]; `config`: the launch "
             "configuration the autotuner kept per kernel pass):\n\n"
             + markdown_table(form_rows, ["model", "pattern", "density", "variant", "ms", "efficiency", "rel_err",
                                          "config"])) if form_rows else ""
    return (markdown_table(rows, cols) + "\n\nDense SDPA per backend (ms):\n\n"
            + markdown_table(dense_rows, ["model", "method", "ms"]) + forms + v2 + low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    parser.add_argument("--patterns", nargs="*", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rep-ms", type=float, default=200)
    parser.add_argument("--check-rows", type=int, default=128)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--variants", nargs="*", default=[f"{a}/{b}" for a, b in VARIANTS],
                        help="forms of ours as loads/loop, loads/loop/schedule (the kernel's program order, "
                             "heavy_first by default or grid) or loads/loop/schedule/descriptors (auto by default, "
                             "device or host)")
    parser.add_argument("--stem", default="attention", help="result file name (without extension)")
    parser.add_argument("--precisions", nargs="*", default=[], choices=["fp8", "int8"],
                        help="also time each TMA variant in these 8-bit precisions (records with that dtype)")
    parser.add_argument("--v2", nargs="*", type=float, default=list(V2_SPARSITIES),
                        help="RainFusion 2.0 sparsities to time (prediction included); none: skip v2")
    parser.add_argument("--copy-launches", nargs="*", default=[], metavar="ROWSxWARPS", type=_copy_launch,
                        help="also time v2's row copies (tiles order) at these rows x warps per program, e.g. "
                             "128x8 (the record's copy_sweep_ms)")
    parser.add_argument("--descriptors", nargs="+", default=["auto"], choices=["device", "host", "auto"],
                        help="v2's kernel with its TMA descriptors made by each of these (the kernel's option)")
    parser.add_argument("--v2-orders", nargs="+", default=["tiles"], choices=["tiles", "tokens"],
                        help="v2's block orders to time (option 'order'; 'tiles', the default, copies each head "
                             "into its order, 'tokens' reads in place)")
    args = parser.parse_args()
    args.variants = [tuple(v.split("/")) for v in args.variants]
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    env = environment()
    out_dir = args.out / gpu_slug(str(env.get("gpu", "cpu")))
    records: list[dict] = []

    def log(msg):
        print(msg, flush=True)

    for model in args.shapes:
        heads, D, layout = SHAPES[model]
        bench_shape(model, heads, D, layout, args, records, log)
        md = (f"# Attention benchmark ({env.get('gpu')})\n\n"
              f"torch {env['torch']}, triton {env['triton']}, cuDNN {env.get('cudnn')}, CUDA {env.get('cuda')}\n\n"
              f"Command: `{env['command']}`\n\nefficiency = best_dense_ms * density / ms (block density, "
              "text blocks included); B=1, bf16, contiguous (B, H, N, D).\n\n" + summarize(records) + "\n")
        write_results(out_dir, args.stem, env, records, md)
        torch.cuda.empty_cache()
    print(summarize(records))


if __name__ == "__main__":
    main()
