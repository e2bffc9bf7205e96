"""Where the block-sparse attention kernel runs and how it is launched: the feature checks (TMA
tensor descriptors, warp specialisation, FP8) and the autotuner's configurations with their pruning.

The block sizes are the plan table's (BLOCK_M x BLOCK_N); only warps, stages, warp specialisation and
key sub-tiles are tuned. Not here: the kernels (``sparse_loop``, ``sparse_tiles``) and the launcher
(``block_sparse``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["CONFIGS", "INTERPRET", "descriptor_blocks", "fp8_runs", "gpu_configs", "has_tma", "launch_config",
           "prune_configs", "supports_warp_specialize", "tma_runs"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_tma() -> bool:
    """TMA tensor descriptors made on the device: Triton >= 3.4 on compute capability >= 9.0."""
    if INTERPRET or not torch.cuda.is_available() or not hasattr(tl, "make_tensor_descriptor"):
        return False
    return torch.cuda.get_device_capability()[0] >= 9 and hasattr(triton, "set_allocator")


def tma_runs() -> bool:
    """Where ``loads="tma"`` can run: Hopper, or the interpreter (it emulates tensor descriptors)."""
    return has_tma() or (INTERPRET and hasattr(tl, "make_tensor_descriptor"))


def fp8_runs(device: torch.device) -> bool:
    """Whether ``precision="fp8"`` can run on ``device``: TMA loads (Hopper, or the interpreter)."""
    return tma_runs() and (INTERPRET or device.type == "cuda")


def supports_warp_specialize() -> bool:
    """``tl.range(..., warp_specialize=True)`` exists from Triton 3.4 and pays on Hopper only."""
    if not has_tma():
        return False
    import inspect

    try:
        return "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError):
        return False


def descriptor_blocks(nargs: dict) -> None:
    """Every configuration's pre-launch hook: with host-made descriptors (``HOST_DESCRIPTORS``), the tile each one
    moves, which depends on the configuration's key sub-tiles (``SPLIT_N``); the launcher made them with the
    other block dims. Q and the output move [BLOCK_M, D] tiles, K and V [BLOCK_N / SPLIT_N, D] (FP8's transposed
    V [D, BLOCK_N / SPLIT_N])."""
    if not nargs.get("HOST_DESCRIPTORS"):
        return
    d, sub_n = nargs["HEAD_DIM"], nargs["BLOCK_N"] // nargs["SPLIT_N"]
    nargs["QDesc"].block_shape = nargs["ODesc"].block_shape = [1, 1, 1, nargs["BLOCK_M"], d]
    nargs["KDesc"].block_shape = [1, 1, 1, sub_n, d]
    nargs["VDesc"].block_shape = [1, 1, 1, d, sub_n] if nargs["FP8"] else [1, 1, 1, sub_n, d]


def launch_config(warp_specialize: bool, split_n: int, warps: int, stages: int) -> triton.Config:
    """One launch configuration of the block-sparse kernel (its tile shapes set by ``descriptor_blocks``)."""
    return triton.Config({"WARP_SPECIALIZE": warp_specialize, "SPLIT_N": split_n}, num_warps=warps,
                         num_stages=stages, pre_hook=descriptor_blocks)


# Measured on H100 (benchmarks/results/nvidia-h100-80gb-hbm3/NOTES.md).


def gpu_configs(warp_specialize: bool) -> list[triton.Config]:
    """The GPU launch configurations (before pruning); ``warp_specialize`` adds the specialised ones."""
    # (warps, stages, key sub-tiles per plan block). H100 run 2 chose w4/s3 + warp specialisation at
    # d=64 and w8/s3 at d=128; SPLIT_N=2 never won (benchmarks/results/nvidia-h100-80gb-hbm3/NOTES.md).
    plain = [(4, 2, 1), (4, 3, 1), (8, 2, 1), (8, 3, 1), (8, 3, 2)]
    configs = [launch_config(False, n, w, s) for w, s, n in plain]
    # Triton 3.6: warp specialisation only takes with 4 warps, and only with 2 stages: with 3 it gave NaN at
    # every one of 30 repeats at d=64 in bf16 (the intermittent two_pass NaN: the autotuner chose it at times)
    # and needs more shared memory than the H100 has at d=128 (stress_two_pass_run1.log there).
    if warp_specialize:
        configs.append(launch_config(True, 1, 4, 2))
    return configs


def _configs() -> list[triton.Config]:
    if INTERPRET or not torch.cuda.is_available():
        return [launch_config(False, 1, 4, 1)]
    return gpu_configs(supports_warp_specialize())


def prune_configs(configs, named_args, **kwargs):
    """Warp specialisation only with TMA loads; without it, 4 warps at d=128 spill registers (H100:
    255 registers and spills for a 128x64 tile, against none with 8 warps)."""
    args = {**named_args, **kwargs}
    kept = [
        c for c in configs
        if (args.get("USE_TMA") or not c.kwargs.get("WARP_SPECIALIZE"))
        and not (args.get("HEAD_DIM") == 128 and c.num_warps == 4 and not c.kwargs.get("WARP_SPECIALIZE"))
        and not (args.get("HEAD_DIM") == 64 and c.num_warps == 8 and c.num_stages == 2)
        and args.get("BLOCK_N", 128) % (16 * c.kwargs.get("SPLIT_N", 1)) == 0
        # Only the unmasked pass specialises, and only without a key bias: a masked loop, or the
        # bias gathered in the loop, crashes Triton 3.6's specialisation passes (NOTES.md entries 4-5).
        and not (c.kwargs.get("WARP_SPECIALIZE") and (args.get("LOOP") != 2 or args.get("HAS_BIAS")))
    ]
    return kept or configs[:1]


CONFIGS = _configs()
