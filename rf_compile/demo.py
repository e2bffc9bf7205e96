"""`make demo`: RainFusion on small random diffusers video transformers, in one command.

For CogVideoX, HunyuanVideo and Wan (tiny random configs, no downloads): compile with
``backend="rainfusion"``, print the site table, run a few denoising-like steps with a progress
bar, print the chosen head patterns, and check ``mode="dense"`` against eager. Then a diffusers
``WanPipeline`` end to end: two videos at two resolutions and step counts, each warmed up on its own
step count. On a CUDA machine it also times one real-size attention call (CogVideoX-5B shape),
dense vs RainFusion.
"""

from __future__ import annotations

import argparse
import collections

import torch
from tqdm import tqdm

import rf_compile
from rf_compile.presets import build_preset

MODELS = ("cogvideox", "hunyuanvideo", "wan")


def _with_timestep(preset, timestep: float) -> tuple[tuple, dict]:
    """The preset's inputs with its ``timestep`` replaced by ``timestep``."""
    kwargs = dict(preset.kwargs)
    old = kwargs["timestep"]
    kwargs["timestep"] = torch.full_like(old, timestep)
    return preset.args, kwargs


def _pattern_shares(stats: dict) -> dict[str, float]:
    totals = collections.Counter()
    for site in stats.values():
        for head in site["heads"]:
            totals.update({p: head[p] for p in ("spatial", "temporal", "textural")})
    count = sum(totals.values()) or 1
    return {p: totals[p] / count for p in ("spatial", "temporal", "textural")}


def sparsity_line(stats: dict) -> str:
    """The sparse calls' measured sparsity and kept key blocks, and why a tiny model keeps every block."""
    sparse = [site for site in stats.values() if site["sparse_calls"] and site["block_density"] is not None]
    if not sparse:
        return "no sparse call"
    sparsity = sum(site["sparsity"] for site in sparse) / len(sparse)
    blocks = sum(site["block_density"] for site in sparse) / len(sparse)
    line = f"sparse calls: sparsity {sparsity:.2f}, key blocks kept {blocks:.2f}"
    if blocks > 0.999 and sparsity < 0.001:
        line += (" (these sequences fit in a few 128-token blocks, which v1's predicted heads keep whole; the "
                 "paper's checkerboard, options={'textural': 'checkerboard'}, is sparse at any size)")
    return line


def demo_model(name: str, steps: int) -> None:
    preset = build_preset(name, "tiny", batch=2)
    model = preset.model.eval()
    options = {"min_video_tokens": 0, "num_steps": steps}  # warm-up: the first 10% of these steps
    print(f"\n=== {name} (tiny, random weights, batch 2 as with CFG) ===")
    compiled = torch.compile(model, backend="rainfusion", options={**options, "report": True})
    rf_compile.reset()
    with torch.no_grad():
        for t in tqdm(torch.linspace(999, 0, steps).tolist(), desc=f"{name} steps", unit="step"):
            args, kwargs = _with_timestep(preset, t)
            out = compiled(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        stats = rf_compile.stats(model)
        shares = _pattern_shares(stats)
        dense_calls = sum(s["dense_calls"] for s in stats.values())
        calls = sum(s["calls"] for s in stats.values())
        print(
            "head patterns chosen by the ARM: "
            + ", ".join(f"{p} {share:.0%}" for p, share in shares.items())
            + f"  ({dense_calls}/{calls} site calls dense during warm-up)"
        )
        print(sparsity_line(stats))
        eager = model(*args, **kwargs)
        eager = eager[0] if isinstance(eager, tuple) else getattr(eager, "sample", eager)
        dense = torch.compile(model, backend="rainfusion", options={**options, "mode": "dense"})(*args, **kwargs)
        dense = dense[0] if isinstance(dense, tuple) else getattr(dense, "sample", dense)
    print(f"mode='dense' vs eager: max |diff| = {(dense - eager).abs().max().item():.2e}")
    rel = ((out - eager).norm() / eager.norm()).item()
    print(f"sparse (v1) vs eager dense, last step: relative L2 error = {rel:.3f}")


def tiny_wan_pipeline(tokenizer=None, text_encoder=None, transformer=None):
    """A ``WanPipeline`` around ``transformer`` (default: the tiny ``wan`` preset) and a tiny
    ``AutoencoderKLWan`` (4x temporal, 8x spatial; random weights). Without a tokenizer and text
    encoder, call it with ``prompt_embeds`` and ``negative_prompt_embeds``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = (transformer or build_preset("wan", "tiny").model).eval()
    channels = transformer.config.in_channels
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * channels, latents_std=[1.0] * channels,
    ).eval()  # fmt: skip
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def demo_pipeline(videos: tuple[tuple[int, int, int, int], ...] = ((9, 128, 192, 20), (5, 96, 160, 10))) -> None:
    """``pipe.transformer = torch.compile(pipe.transformer, backend="rainfusion")`` and ``pipe(...)`` per
    (frames, height, width, steps): no ``num_steps`` option, each video's warm-up takes its own count."""
    print("\n=== WanPipeline (tiny transformer and VAE, random prompt embeddings, CFG as two calls) ===")
    pipe = tiny_wan_pipeline()
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="rainfusion", options={"min_video_tokens": 0})
    text = build_preset("wan", "tiny").kwargs["encoder_hidden_states"]
    rf_compile.reset()
    for frames, height, width, steps in videos:
        with torch.no_grad():
            video = pipe(
                prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text), num_inference_steps=steps,
                height=height, width=width, num_frames=frames, output_type="pt",
            ).frames  # fmt: skip
        site = next(iter(rf_compile.stats(model).values()))
        layout, entry = list(site["by_layout"].items())[-1]
        print(f"{frames}x{height}x{width} px, {steps} steps -> video {tuple(video.shape)}; tokens {layout}: "
              f"{entry['dense_calls']} dense + {entry['sparse_calls']} sparse calls per site; "
              f"warm-up {site['warmup_steps']} step(s) ({site['num_steps_from']})")  # fmt: skip


def time_real_attention() -> None:
    """One CogVideoX-5B attention call (48 heads x 64, 13x30x45 + 226 text), dense SDPA vs RainFusion."""
    import triton.testing

    layout = rf_compile.VideoLayout(13, 30, 45, prefix=226)
    q, k, v = (torch.randn(1, 48, layout.seq_len, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    sparse_ms = triton.testing.do_bench(lambda: rf_compile.sparse_attention(q, k, v, layout))
    print(f"\nCogVideoX-5B attention on {torch.cuda.get_device_name()}: dense SDPA {dense_ms:.2f} ms, "
          f"RainFusion v1 {sparse_ms:.2f} ms (ARM included): {dense_ms / sparse_ms:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="presets to run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=6, help="denoising-like steps per model (default: 6)")
    args = parser.parse_args(argv)
    print(f"rf_compile {rf_compile.__version__}, torch {torch.__version__}")
    print(
        "Random weights carry no attention structure, so the ARM finds neither band and picks textural "
        "heads; benchmarks/fidelity.py shows it on heads with planted structure."
    )
    for name in args.models:
        demo_model(name, args.steps)
    demo_pipeline()
    if torch.cuda.is_available():
        time_real_attention()


if __name__ == "__main__":
    main()
