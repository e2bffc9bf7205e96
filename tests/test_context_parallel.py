"""The backend under diffusers context parallelism (Ulysses), on CPU: 2 processes, gloo.

One ``torch.multiprocessing`` spawn runs every distributed case (each rank saves its results);
the single-process references are computed here. Cases:

- tiny Wan with ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` and the ``native``
  attention backend: the self-attention SDPA sees the global sequence (72 tokens) for 1 of 2 heads;
  ``mode="dense"`` equals eager CP; sparse mode (layout inferred through the all-to-all, and with
  the layout option) equals the single-process sparse output (each rank's ARM decides its heads).
- a ring-shaped module (local query against each rank's key/value shard): stays dense, with or
  without a layout option, and says why.
- Ulysses over a joint [video shard, text shard] sequence (HunyuanVideo-like, with padded text keys):
  after the all-to-all the shards are interleaved, a layout in rank shards: sparse (v1 and v2) and
  equal to the single-process sparse output; two video grids per rank stay dense with a reason.
- the tiny HunyuanVideo preset under Ulysses (``benchmarks/e2e_cp.py``'s plan: diffusers 0.42.1 has
  none for it): its joint sites are sparse and equal the single-process sparse output.

diffusers 0.42.1 needs two work-arounds on a CPU-only torch (see ``_enable_ulysses``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
# The paper's v1: its checkerboard is sparse at these tiny sizes, where predicted 128-token blocks keep every key.
SPARSE = {"dense_warmup": 0.0, "min_video_tokens": 0, "textural": "checkerboard"}
# Wan's sparse compile runs inductor under Ulysses; the other cases check the passes (which sites, which rank
# shards) and run the rewritten graph without inductor, which halves this module's cold time on 2 cores.
PASSES_ONLY = {**SPARSE, "compiler": "eager"}
WAN_LAYOUT = (3, 4, 6)  # tiny Wan: latent 3x8x12, patch 1x2x2
RING_GRID = (4, 4, 6)  # the ring module's global grid; each rank holds 2 frames
JOINT_GRID = (4, 16, 16)  # the joint module's grid: 8 kernel blocks, so v2 plans are sparse


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result.sample


def _wan():
    from rf_compile.presets import build_preset

    preset = build_preset("wan", "tiny", batch=2, seed=0)
    preset.model.set_attention_backend("native")  # CP-capable and runs on CPU (flash/cudnn need CUDA)
    return preset


def _enable_ulysses(model, degree: int) -> None:
    """``enable_parallelism`` with Ulysses, working around two diffusers 0.42.1 issues on CPU-only torch.

    - ``ModelMixin._resolve_parallel_config`` computes ``rank % torch.accelerator.device_count()``,
      which is 0 without an accelerator: ZeroDivisionError. We report one device while it runs.
    - Wan's ``_cp_plan`` splits a 2-D (per-token) ``timestep``; a 1-D one reaches
      ``logger.warning_once``, which diffusers' logger lacks: AttributeError. That entry only serves
      Wan 2.2's per-token timesteps, so we pass the plan without it.
    """
    from diffusers import ContextParallelConfig

    plan = {key: value for key, value in type(model)._cp_plan.items() if key != ""}
    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree), cp_plan=plan)


def _hunyuan(parallel: bool):
    """Tiny HunyuanVideo (native attention, every text token valid), with benchmarks/e2e_cp.py's Ulysses plan
    if ``parallel``: diffusers 0.42.1 has no ``_cp_plan`` for it, and builds its key mask from local lengths."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from e2e_cp import enable_cp

    from rf_compile.presets import build_preset

    preset = build_preset("hunyuanvideo", "tiny", seed=0)
    preset.model.set_attention_backend("native")
    preset.kwargs["encoder_attention_mask"] = torch.ones_like(preset.kwargs["encoder_attention_mask"])
    if parallel:
        enable_cp("hunyuanvideo", preset, WORLD)
    return preset


def _compile(module, options, *args, **kwargs):
    from rf_compile.backend import compiled_graphs, reports_since

    torch._dynamo.reset()
    start = compiled_graphs()
    compiled = torch.compile(module, backend="rainfusion", options=options, fullgraph=True)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    sites = [(s.name, s.status, s.layout, s.reason) for r in reports_since(start) for s in r.sites]
    return out, sites


class _RingShaped(torch.nn.Module):
    """Each rank: its shard of the video tokens as query, against every rank's key/value shard (gathered)."""

    def __init__(self, channels: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(channels, 3 * channels)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # (B, C, F, H, W)
        import torch.distributed._functional_collectives as funcol

        tokens = video.flatten(2).transpose(1, 2)  # (B, N, C), frame-major
        local = tokens.chunk(WORLD, dim=1)[dist.get_rank()]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(local).chunk(3, dim=-1))
        kv = funcol.all_gather_tensor(torch.stack([k, v]).contiguous(), gather_dim=0, group=dist.group.WORLD)
        kv = funcol.wait_tensor(kv)
        out = 0
        for i in range(WORLD):
            out = out + F.scaled_dot_product_attention(q, kv[2 * i], kv[2 * i + 1])
        return out


class _Joint(torch.nn.Module):
    """Joint [video, text] attention (HunyuanVideo-like) through diffusers' dispatch; with a parallel
    config each rank joins its video shard and text shard, then Ulysses attention gathers them in rank
    order: [v0, t0, v1, t1]. ``clip``: a second, smaller video takes the text's place (two grids per rank)."""

    def __init__(self, parallel_config=None, clip: bool = False, channels: int = 32, heads: int = 2):
        super().__init__()
        self.parallel_config, self.clip, self.heads = parallel_config, clip, heads
        self.qkv = torch.nn.Linear(channels, 3 * channels)

    def forward(self, video: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        tokens = video.flatten(2).transpose(1, 2)
        other = text if not self.clip else video[:, :, :2, :2].flatten(2).transpose(1, 2)
        if self.parallel_config is not None:
            rank = dist.get_rank()
            tokens, other, text_mask = (t.chunk(WORLD, dim=1)[rank] for t in (tokens, other, text_mask))
        # Additive (0 / -inf): inductor's CPU code for a boolean mask gathered by gloo fails (int64 mask).
        mask = torch.cat([torch.zeros_like(tokens[..., 0]), text_mask], dim=1)
        joint = torch.cat([tokens, other], dim=1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in self.qkv(joint).chunk(3, dim=-1))
        mask = None if self.clip else mask[:, None, None, :]
        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend="native", parallel_config=self.parallel_config)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        preset = _wan()
        model = preset.model
        _enable_ulysses(model, WORLD)
        with torch.no_grad():
            results["eager"] = _output(model(*preset.args, **preset.kwargs))
        for name, options in {
            "dense": {"mode": "dense", **PASSES_ONLY},
            "sparse": SPARSE,
            "sparse_layout": {**PASSES_ONLY, "layout": WAN_LAYOUT},
        }.items():
            out, sites = _compile(model, options, *preset.args, **preset.kwargs)
            results[name], results[f"{name}_sites"] = _output(out), sites

        torch.manual_seed(1)
        ring = _RingShaped().eval()
        video = torch.randn(2, 32, *RING_GRID)
        local_layout = (RING_GRID[0] // WORLD, *RING_GRID[1:])
        with torch.no_grad():
            results["ring_eager"] = ring(video)
        results["ring"], results["ring_sites"] = _compile(ring, PASSES_ONLY, video)
        _, results["ring_layout_sites"] = _compile(ring, {**PASSES_ONLY, "layout": local_layout}, video)

        joint_inputs = _joint_inputs()
        for name, clip in (("joint", False), ("clip", True)):
            torch.manual_seed(2)
            joint = _Joint(model._parallel_config, clip=clip).eval()
            for mode in ("v1", "v2"):
                key = f"{name}_{mode}"
                results[key], results[f"{key}_sites"] = _compile(joint, {**PASSES_ONLY, "mode": mode}, *joint_inputs)
        for shards in (1, WORLD):  # a layout option without / with the rank shards
            torch.manual_seed(2)
            joint = _Joint(model._parallel_config).eval()
            option = {**PASSES_ONLY, "layout": {"frames": 4, "height": 16, "width": 16, "suffix": 8, "shards": shards}}
            key = f"joint_option{shards}"
            results[key], results[f"{key}_sites"] = _compile(joint, option, *joint_inputs)
        hunyuan = _hunyuan(parallel=True)
        from e2e_cp import gather_bools_as_bytes

        with gather_bools_as_bytes():
            for mode in ("v1", "v2"):
                out, sites = _compile(hunyuan.model, {**PASSES_ONLY, "mode": mode}, *hunyuan.args, **hunyuan.kwargs)
                results[f"hunyuan_{mode}"], results[f"hunyuan_{mode}_sites"] = _output(out), sites
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _joint_inputs() -> tuple[torch.Tensor, ...]:
    """Video (4x16x16 tokens), 8 text tokens of which the last 3 are padding (a key mask in the text shards)."""
    torch.manual_seed(3)
    text_mask = torch.zeros(2, 8)
    text_mask[:, -3:] = float("-inf")
    return torch.randn(2, 32, *JOINT_GRID), torch.randn(2, 8, 32), text_mask


@pytest.fixture(scope="module")
def single():
    """The same tiny Wan and inputs in one process: eager and sparse (no layout option)."""
    preset = _wan()
    with torch.no_grad():
        eager = _output(preset.model(*preset.args, **preset.kwargs))
    out, sites = _compile(preset.model, SPARSE, *preset.args, **preset.kwargs)
    torch._dynamo.reset()
    return {"eager": eager, "sparse": _output(out), "sites": sites}


def _self_attention(sites):
    return [s for s in sites if s[0].endswith("attn1")]


def test_ulysses_eager_matches_single_process(ranks, single):
    for result in ranks:
        torch.testing.assert_close(result["eager"], single["eager"], atol=1e-5, rtol=1e-5)


def test_dense_mode_matches_eager_under_ulysses(ranks):
    for result in ranks:
        torch.testing.assert_close(result["dense"], result["eager"], atol=2e-5, rtol=2e-5)
        assert len(_self_attention(result["dense_sites"])) == 2


@pytest.mark.parametrize("case", ["sparse", "sparse_layout"])
def test_sparse_under_ulysses_matches_single_process_sparse(ranks, single, case):
    from rf_compile.layout import VideoLayout

    for result in ranks:
        attn1 = _self_attention(result[f"{case}_sites"])
        assert [s[0] for s in attn1] == ["blocks.0.attn1", "blocks.1.attn1"]  # no hook wrapper in the name
        assert {(status, layout) for _, status, layout, _ in attn1} == {("sparse", VideoLayout(*WAN_LAYOUT))}
        torch.testing.assert_close(result[case], single["sparse"], atol=1e-5, rtol=1e-5)
    rel = ((single["sparse"] - single["eager"]).norm() / single["eager"].norm()).item()
    assert rel > 1e-6  # the sparse output really differs from dense: the match above is not trivial


@pytest.mark.parametrize("sites", ["ring_sites", "ring_layout_sites"])
def test_ring_shaped_attention_stays_dense_with_a_reason(ranks, sites):
    for result in ranks:
        found = result[sites]
        assert len(found) == WORLD
        for _, status, _, reason in found:
            assert status == "dense"
            assert "sequence-sharded attention" in reason and "1 of 2 chunks" in reason, reason
        torch.testing.assert_close(result["ring"], result["ring_eager"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def single_joint():
    """The joint [video, text] module in one process: dense and sparse outputs, per mode."""
    torch.manual_seed(2)
    joint = _Joint().eval()
    inputs = _joint_inputs()
    with torch.no_grad():
        results = {"eager": joint(*inputs)}
    for mode in ("v1", "v2"):
        results[mode], results[f"{mode}_sites"] = _compile(joint, {**PASSES_ONLY, "mode": mode}, *inputs)
    torch._dynamo.reset()
    return results


def _rank_rows(out: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows of a single-process joint output that rank ``rank`` holds: [its video shard, its text shard]."""
    video, text = out.split([out.shape[1] - 8, 8], dim=1)
    return torch.cat([video.chunk(WORLD, dim=1)[rank], text.chunk(WORLD, dim=1)[rank]], dim=1)


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_ulysses_over_joint_shards_is_sparse_and_matches_single_process(ranks, single_joint, mode):
    from rf_compile.layout import VideoLayout

    ((_, status, layout, _),) = single_joint[f"{mode}_sites"]
    assert (status, layout) == ("sparse", VideoLayout(*JOINT_GRID, suffix=8))
    for rank, result in enumerate(ranks):
        ((_, status, layout, reason),) = result[f"joint_{mode}_sites"]
        assert (status, layout) == ("sparse", VideoLayout(*JOINT_GRID, suffix=8, shards=WORLD)), reason
        assert "in 2 interleaved rank shards" in layout.describe()
        torch.testing.assert_close(result[f"joint_{mode}"], _rank_rows(single_joint[mode], rank), atol=1e-5, rtol=1e-5)
    dense, sparse = single_joint["eager"], single_joint[mode]
    assert ((sparse - dense).norm() / dense.norm()).item() > 1e-3  # sparse really differs from dense


@pytest.fixture(scope="module")
def single_hunyuan():
    """Tiny HunyuanVideo in one process: dense and sparse outputs, per mode."""
    preset = _hunyuan(parallel=False)
    with torch.no_grad():
        results = {"eager": _output(preset.model(*preset.args, **preset.kwargs))}
    for mode in ("v1", "v2"):
        options = {**PASSES_ONLY, "mode": mode}
        out, results[f"{mode}_sites"] = _compile(preset.model, options, *preset.args, **preset.kwargs)
        results[mode] = _output(out)
    torch._dynamo.reset()
    return results


def _joint_sites(sites) -> list:
    """HunyuanVideo's joint [video, text] self-attention sites (not the text-only token refiner)."""
    return [s for s in sites if "token_refiner" not in s[0]]


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_hunyuanvideo_under_ulysses_is_sparse_and_matches_single_process(ranks, single_hunyuan, mode):
    single = _joint_sites(single_hunyuan[f"{mode}_sites"])
    assert single and {s[1] for s in single} == {"sparse"}
    for result in ranks:
        sites = _joint_sites(result[f"hunyuan_{mode}_sites"])
        assert [s[0] for s in sites] == [s[0] for s in single]
        for (_, status, layout, reason), (_, _, single_layout, _) in zip(sites, single, strict=True):
            assert status == "sparse", reason
            assert layout.shards == WORLD and layout == dataclasses.replace(single_layout, shards=WORLD)
        torch.testing.assert_close(result[f"hunyuan_{mode}"], single_hunyuan[mode], atol=1e-5, rtol=1e-5)
    if mode == "v1":  # v2's 128-token blocks cover the tiny sequence in a few blocks, all kept (see the joint case)
        dense, sparse = single_hunyuan["eager"], single_hunyuan[mode]
        assert ((sparse - dense).norm() / dense.norm()).item() > 1e-4


def test_a_layout_option_must_give_the_rank_shards(ranks, single_joint):
    for rank, result in enumerate(ranks):
        ((_, status, _, reason),) = result["joint_option1_sites"]
        assert status == "dense" and "give shards=2 in the option" in reason, reason
        ((_, status, _, reason),) = result[f"joint_option{WORLD}_sites"]
        assert status == "sparse", reason
        torch.testing.assert_close(result[f"joint_option{WORLD}"], _rank_rows(single_joint["v1"], rank))


def test_ulysses_over_two_grids_per_rank_stays_dense_with_a_reason(ranks):
    for result in ranks:
        for mode in ("v1", "v2"):
            ((_, status, _, reason),) = result[f"clip_{mode}_sites"]
            assert status == "dense"
            assert "no VideoLayout describes" in reason and "2-way shard" in reason, reason
