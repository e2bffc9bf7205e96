"""End to end under context parallelism (diffusers Ulysses): inductor vs rainfusion v1 / v2 per step.

A real-size HunyuanVideo-shaped transformer (random bf16 weights, ``--layers`` blocks of each
stack) runs a short Euler loop on every rank of ``torchrun``; with ``--cp N`` (N > 1) the model is
wrapped by ``enable_parallelism(ContextParallelConfig(ulysses_degree=N))`` with the ``native``
attention backend (SDPA inside diffusers' Ulysses all-to-all, the form rainfusion rewrites).
``--cp 1`` is the single-GPU baseline (plain ``python``, no torchrun needed). Records (``model``,
``cp``, ``variant``, ``ms_per_step``, ...) merge into ``benchmarks/results/<gpu>x<G>/e2e_cp.json`` and
``.md``, G the GPUs of the machine, so both runs on one 2-GPU host land in one table with the
1 -> cp scaling of each variant (``scaling``: ms per step at cp 1 / at this cp).

    python benchmarks/e2e_cp.py --cp 1 --model wan --layers 8
    torchrun --nproc-per-node 2 benchmarks/e2e_cp.py --cp 2 --model wan --layers 8
    python benchmarks/e2e_cp.py --cp 1 --size tiny --steps 2   # CPU smoke run (gloo)

HunyuanVideo has no ``_cp_plan`` in diffusers 0.42.1; ``cp_plan`` gives it one that shards the
video and the text tokens. Ulysses then gathers each rank's [video shard, text shard] in rank
order; rainfusion reads that as the video grid and text in rank shards and stays sparse.
CogVideoX is not here: diffusers 0.42.1 gives it no plan, and its attention processor calls SDPA
directly (no Ulysses all-to-all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from utils import environment, gpu_slug, markdown_table

from rf_compile.backend import compiled_graphs, reports_since
from rf_compile.presets import build_preset

MODELS = {"hunyuanvideo": "HunyuanVideo", "wan": "Wan2.1-14B"}
CFG_BATCH = {"hunyuanvideo": 1, "wan": 2}
VARIANTS = {
    "inductor": {"backend": "inductor"},
    "rf_v1": {"backend": "rainfusion", "options": {"mode": "v1"}},
    "rf_v2": {"backend": "rainfusion", "options": {"mode": "v2", "sparsity_ramp": 0}},  # flat: see e2e.V2
}


def cp_plan(key: str, model) -> dict:
    """The context-parallel plan: diffusers' own, else ours (HunyuanVideo)."""
    from diffusers.models._modeling_parallel import ContextParallelInput as In
    from diffusers.models._modeling_parallel import ContextParallelOutput as Out

    if key == "hunyuanvideo":
        return {
            "rope": {0: In(split_dim=0, expected_dims=2, split_output=True), 1: In(0, 2, split_output=True)},
            "x_embedder": {0: In(split_dim=1, expected_dims=3, split_output=True)},
            "context_embedder": {0: In(split_dim=1, expected_dims=3, split_output=True)},
            "proj_out": Out(gather_dim=1, expected_dims=3),
        }
    # Without the "" entry: it splits Wan 2.2's per-token timesteps only, and a 1-D timestep reaches
    # logger.warning_once, which diffusers 0.42.1's logger lacks (AttributeError).
    return {k: v for k, v in type(model)._cp_plan.items() if k != ""}


def enable_cp(key: str, preset, degree: int) -> None:
    from diffusers import ContextParallelConfig

    model = preset.model
    model.set_attention_backend("native")
    if key == "hunyuanvideo":
        # The model builds its key-padding mask from local lengths: keep every text token valid.
        preset.kwargs["encoder_attention_mask"] = torch.ones_like(preset.kwargs["encoder_attention_mask"])
    count = torch.accelerator.device_count() or 1  # CPU-only torch: 0, and diffusers takes rank % count
    with mock.patch.object(torch.accelerator, "device_count", lambda: count):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree), cp_plan=cp_plan(key, model))
    for name, module in model.named_modules():  # the text-only refiner runs on full, unsharded text
        if "token_refiner" in name and hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor._parallel_config = None


@contextlib.contextmanager
def gather_bools_as_bytes():
    """CPU runs: Ulysses all-gathers HunyuanVideo's boolean key mask with ``dist.all_gather``, and inductor's CPU
    code makes that gathered mask int64 (torch 2.13, gloo), which SDPA rejects. Gathering it as uint8 is exact."""
    all_gather = dist.all_gather

    def gather(tensors, tensor, *args, **kwargs):
        if tensor.dtype != torch.bool:
            return all_gather(tensors, tensor, *args, **kwargs)
        parts = [torch.empty_like(t, dtype=torch.uint8) for t in tensors]
        work = all_gather(parts, tensor.to(torch.uint8), *args, **kwargs)
        for t, part in zip(tensors, parts, strict=True):
            t.copy_(part.bool())
        return work

    with mock.patch.object(dist, "all_gather", gather):
        yield


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, spec: dict, preset, timesteps: list[float], device: str) -> dict:
    torch._dynamo.reset()
    start_reports = compiled_graphs()
    options = spec.get("options")
    if options is not None and preset.size == "tiny":  # smoke runs: let the tiny grid be sparse
        options = {**options, "min_video_tokens": 0, "cost_model": False}
    model = torch.compile(preset.model, backend=spec["backend"], options=options)
    x, kwargs = preset.args[0], dict(preset.kwargs)
    times = []
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        model(*preset.args, **preset.kwargs)
        _sync(device)
        compile_s = time.perf_counter() - start
        for t, t_next in zip(timesteps, [*timesteps[1:], 0.0]):
            kwargs["timestep"] = torch.full_like(preset.kwargs["timestep"], t)
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            out = model(x, *preset.args[1:], **kwargs)[0]
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
            x = x + (t_next - t) / 1000.0 * out
    sites = [s for r in reports_since(start_reports) for s in r.sites]
    dense_reasons = sorted({s.reason for s in sites if s.status == "dense" and s.reason})
    worst = torch.tensor(statistics.median(times), device=device if device == "cuda" else "cpu")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
    return {
        "variant": name,
        "ms_per_step": worst.item(),
        "ms_steps_rank0": times,
        "compile_s": compile_s,
        "sparse_sites": sum(s.status == "sparse" for s in sites),
        "dense_sites": sum(s.status == "dense" for s in sites),
        "dense_reasons": dense_reasons,
        "latent": x,
    }


def with_scaling(records: list[dict]) -> list[dict]:
    """Records sorted by (model, layers, size, variant, cp), each with ``scaling``: ms per step at cp 1 / at its cp
    (NaN without a cp 1 record of the same model, variant, layers and size)."""

    def key(r: dict) -> tuple:
        return (r["model"], r["layers"], r["size"], r["variant"])

    base = {key(r): r["ms_per_step"] for r in records if r["cp"] == 1}
    out = [{**r, "scaling": base[key(r)] / r["ms_per_step"] if key(r) in base else float("nan")} for r in records]
    return sorted(out, key=lambda r: (*key(r), r["cp"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", type=int, required=True, help="ulysses degree = torchrun --nproc-per-node")
    parser.add_argument("--model", default="hunyuanvideo", choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=4, help="blocks of each stack (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10, first 10%% dense)")
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: CPU smoke run")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>x<cp>)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if "RANK" not in os.environ:  # plain `python e2e_cp.py --cp 1`: a one-process group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != args.cp:
        raise SystemExit(f"--cp {args.cp} needs torchrun --nproc-per-node {args.cp} (world size is {world})")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    try:
        preset = build_preset(
            args.model, args.size, batch=CFG_BATCH[args.model], device=device, dtype=dtype, layers=args.layers
        )
        preset.model.eval().requires_grad_(False)
        if args.cp > 1:
            enable_cp(args.model, preset, args.cp)
        elif args.model == "hunyuanvideo":  # same inputs as under CP
            preset.kwargs["encoder_attention_mask"] = torch.ones_like(preset.kwargs["encoder_attention_mask"])
        timesteps = torch.linspace(999, 0, args.steps + 1)[:-1].tolist()
        with contextlib.nullcontext() if cuda else gather_bools_as_bytes():
            results = [run_variant(n, VARIANTS[n], preset, timesteps, device) for n in args.variants]
    finally:
        env = environment()
        dist.destroy_process_group()
    if rank:
        return
    base = next((r for r in results if r["variant"] == "inductor"), results[0])
    ref = base["latent"].double()
    records = []
    for result in results:
        latent = result.pop("latent").double()
        records.append(
            {
                "model": MODELS[args.model],
                "cp": args.cp,
                "layers": args.layers,
                "size": args.size,
                **result,
                "speedup_vs_inductor": base["ms_per_step"] / result["ms_per_step"],
                "rel_err": ((latent - ref).norm() / ref.norm()).item(),
            }
        )
    gpus = torch.cuda.device_count() if cuda else world
    slug = f"{gpu_slug(env.get('gpu', 'cpu'))}x{gpus}"
    out_dir = args.out or Path(__file__).parent / "results" / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "e2e_cp.json"
    old = json.loads(path.read_text())["records"] if path.exists() else []
    run_key = (MODELS[args.model], args.cp, args.layers, args.size)
    all_records = with_scaling([r for r in old if (r["model"], r["cp"], r["layers"], r["size"]) != run_key] + records)
    path.write_text(json.dumps({"environment": env, "records": all_records}, indent=1))
    columns = [
        "model", "cp", "variant", "ms_per_step", "speedup_vs_inductor", "scaling", "compile_s", "sparse_sites",
        "dense_sites", "rel_err",
    ]  # fmt: skip
    table = markdown_table(all_records, columns)
    reasons = sorted({reason for r in all_records for reason in r["dense_reasons"]})
    markdown = (
        f"# End to end under context parallelism (diffusers Ulysses; cp = GPUs)\n\nenv: {env}\n\n"
        f"{args.layers} blocks per stack, {args.steps} Euler steps (first 10% dense), {dtype}; ms_per_step: "
        f"median over steps, max over ranks. rel_err: final latent vs inductor on the same ranks. "
        f"scaling: ms per step at cp 1 / at this cp (same model, variant, layers).\n\n{table}\n\n"
        "Dense-site reasons:\n\n" + "".join(f"- {r}\n" for r in reasons)
    )
    (out_dir / "e2e_cp.md").write_text(markdown)
    print(table)


if __name__ == "__main__":
    main()
