"""What a TMA descriptor made on the device costs a program, against one made on the host, and plain loads.

The attention kernel's empty program (no key block) cost 3.4-3.5 dense key blocks at CogVideoX on an H100
(``fixed_cost_run1.md``): 6,672 programs that each load a Q tile and store an output tile took ~335 us. Each
builds its descriptors with ``tl.make_tensor_descriptor`` (in shared memory, then a GPU-scope release and
acquire fence before the first TMA load; PTX in NOTES.md). This copies one (BLOCK_M x D) tile per program of
a (B, H, N, D) tensor, over the attention kernel's grid, three ways:

- ``device``: per-head descriptors made in the program, as the attention kernel does;
- ``host``: one 4-D descriptor over the whole tensor made on the host (``TensorDescriptor``), the head chosen by
  the tile's coordinates;
- ``pointer``: plain pointer loads and stores.

The difference ``device - host`` over the programs is what host descriptors would save per descriptor pair.

    PYTHONPATH=. python benchmarks/descriptor_cost.py --shapes CogVideoX-5B Wan2.1-14B
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.attention import SHAPES  # noqa: E402
from benchmarks.utils import do_bench, environment, gpu_slug, markdown_table, write_results  # noqa: E402
from rf_compile.plan import BLOCK_M  # noqa: E402

FORMS = ("device", "host", "pointer")


@triton.jit
def _copy_tiles(X, Y, XDesc, YDesc, H, N, stride_b, stride_h, stride_m,
                D: tl.constexpr, BLOCK_M: tl.constexpr, FORM: tl.constexpr):
    """Y[b, h, tile m] = X[b, h, tile m] for program (m, b x h), in the way ``FORM`` names (0 device, 1 host,
    2 pointer descriptors); X and Y share their strides."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offset = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    if FORM == 0:
        x_desc = tl.make_tensor_descriptor(X + offset, shape=[N, D], strides=[stride_m, 1], block_shape=[BLOCK_M, D])
        y_desc = tl.make_tensor_descriptor(Y + offset, shape=[N, D], strides=[stride_m, 1], block_shape=[BLOCK_M, D])
        y_desc.store([m * BLOCK_M, 0], x_desc.load([m * BLOCK_M, 0]))
    elif FORM == 1:
        tile = XDesc.load([b, h, m * BLOCK_M, 0])
        YDesc.store([b, h, m * BLOCK_M, 0], tile)
    else:
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        at = offset + rows[:, None].to(tl.int64) * stride_m + tl.arange(0, D)[None, :]
        tl.store(Y + at, tl.load(X + at, mask=(rows < N)[:, None]), mask=(rows < N)[:, None])


def copy_tiles(x: torch.Tensor, form: str, block_m: int = BLOCK_M) -> torch.Tensor:
    """A copy of the (B, H, N, D) tensor ``x`` (unit stride along D), one program per (query tile, b x h)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    B, H, N, D = x.shape
    y = torch.empty_like(x)
    block = [1, 1, block_m, D]
    x_desc, y_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), block) for t in (x, y))
    if form == "device" and x.is_cuda:  # device-made descriptors need a global scratch allocator
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=x.device))
    _copy_tiles[(triton.cdiv(N, block_m), B * H)](
        x, y, x_desc, y_desc, H, N, x.stride(0), x.stride(1), x.stride(2),
        D=D, BLOCK_M=block_m, FORM=FORMS.index(form), num_warps=4,
    )
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["CogVideoX-5B", "Wan2.1-14B"], choices=list(SHAPES))
    parser.add_argument("--rep-ms", type=float, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--stem", default="descriptor_cost", help="result file name (without extension)")
    args = parser.parse_args()
    env = environment()
    records = []
    for model in args.shapes:
        heads, D, layout = SHAPES[model]
        x = torch.randn(1, heads, layout.seq_len, D, device="cuda", dtype=torch.bfloat16)
        programs = triton.cdiv(layout.seq_len, BLOCK_M) * heads
        for form in FORMS:
            assert torch.equal(copy_tiles(x, form), x), f"{form} copy differs"
            t = do_bench(lambda form=form, x=x: copy_tiles(x, form), rep_ms=args.rep_ms)
            records.append(dict(model=model, heads=heads, head_dim=D, seq_len=layout.seq_len, programs=programs,
                                form=form, ns_per_program=t["ms"] * 1e6 / programs, **t))
            print(f"{model} {form}: {t['ms']:.4f} ms", flush=True)
    md = (f"# TMA descriptors made on the device vs the host ({env.get('gpu')})\n\ntorch {env['torch']}, triton "
          f"{env['triton']}\n\nCommand: `{env['command']}`\n\nOne {BLOCK_M}-row tile copied per program over the "
          "attention kernel's grid (B = 1, bf16); `ns_per_program`: the launch's time over its programs.\n\n"
          + markdown_table(records, ["model", "head_dim", "programs", "form", "ms", "ns_per_program"]) + "\n")
    write_results(args.out / gpu_slug(str(env.get("gpu", "cpu"))), args.stem, env, records, md)
    print(md)


if __name__ == "__main__":
    main()
