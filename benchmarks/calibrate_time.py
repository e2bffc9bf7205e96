"""How long ``rf_compile.calibrate`` takes on a full-size model (random weights: timing only, not quality).

Builds a preset at its published size on the GPU in bf16 (default Wan2.1-1.3B at 832x480, 81 frames:
21x30x52 = 32,760 tokens, 30 blocks, CFG batch 2), and calibrates it with the timestep sweep of
``--steps`` forwards, every candidate density of the default ``candidates`` measured at every site.
The time includes compiling the model. Writes ``calibrate_time.json``/``.md`` and the profile.

    python benchmarks/calibrate_time.py --out $OUT/cal          # H200: the issue's <= 3 min target
    python benchmarks/calibrate_time.py --size tiny --device cpu --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from utils import environment, gpu_slug, markdown_table, write_results

import rf_compile
from rf_compile.presets import build_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan1.3b")
    parser.add_argument("--size", default="full", choices=["tiny", "full"])
    parser.add_argument("--batch", type=int, default=2, help="CFG batch of the pipeline")
    parser.add_argument("--steps", type=int, default=3, help="forwards of the timestep sweep")
    parser.add_argument("--target", type=float, default=0.05)
    parser.add_argument("--options", type=json.loads, default={"order": "tokens"}, help="backend options (JSON)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = environment()
    out = args.out or Path(__file__).resolve().parent / "results" / gpu_slug(env.get("gpu", "cpu"))
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    preset = build_preset(args.preset, args.size, batch=args.batch, device=args.device, dtype=dtype)
    build_s = time.perf_counter() - t0
    options = dict(args.options) if args.size == "full" else {"min_video_tokens": 0, **args.options}
    t0 = time.perf_counter()
    profile = rf_compile.calibrate(preset.model, *preset.args, steps=args.steps, target=args.target,
                                   out=out / "calibrate_time_profile.json", options=options,
                                   **preset.kwargs)  # fmt: skip
    seconds = time.perf_counter() - t0
    (layout,) = preset.expected_layouts
    record = dict(preset=args.preset, size=args.size, layout=layout.describe(), seq_len=layout.seq_len,
                  batch=args.batch, sites=len(profile["sites"]), forwards=args.steps,
                  candidates=len(profile["candidates"]), build_s=round(build_s, 1),
                  calibrate_s=round(seconds, 1), mean_density=profile["mean_density"])  # fmt: skip
    columns = list(record)
    md = f"# Calibration time\n\n`{env['command']}`\n\n{markdown_table([record], columns)}\n"
    write_results(out, "calibrate_time", env, [record], md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
