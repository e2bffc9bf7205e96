"""The benchmark scripts still run (CPU smoke runs; their GPU numbers come from the device)."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def _env() -> dict[str, str]:
    """This checkout first on the path: a script run from benchmarks/ would import an installed rf_compile."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, cwd=BENCHMARKS, timeout=600, env=_env(),
    )  # fmt: skip


def test_fidelity_small_run_writes_its_records(tmp_path):
    result = run("fidelity.py", "--small", "--heads", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "fidelity.json").read_text())["records"]
    keys = {"config", "layout", "planted", "accuracy", "recall_estimated", "recall_exact", "rel_l2", "sparsity"}
    assert records and all(keys <= set(r) for r in records)
    assert {r["config"] for r in records} >= {"v1", "v1+", "v2 s=0.8 topk"}
    assert (tmp_path / "fidelity.png").stat().st_size > 0


def test_e2e_runs_the_pipelines_steps_and_extrapolates_the_video(tmp_path):
    """Tiny Wan2.1-1.3B through the full-config path: the timed steps sit at the pipeline scheduler's timesteps,
    rainfusion's sites count the skipped warm-up steps as the pipeline would, and the whole-video figures follow
    from the measured steps."""
    num_steps, steps = 30, 2
    result = run(
        "e2e.py", "--size", "tiny", "--config", "full", "--models", "wan1.3b", "--variants", "eager", "rf_v1",
        "--steps", str(steps), "--num-steps", str(num_steps), "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    eager, v1 = json.loads((tmp_path / "e2e.json").read_text())["records"]
    keys = {"model", "layers", "variant", "mode", "ms_per_step", "dense_ms", "video_s", "timesteps", "num_steps",
            "warmup_steps", "speedup_vs_eager", "speedup_vs_inductor", "video_speedup_vs_eager",
            "video_speedup_vs_inductor", "compile_s", "peak_gib", "attention_share", "graph_breaks", "recompiles",
            "rel_err"}  # fmt: skip
    assert keys <= set(eager) and keys | {"sites", "dense_calls", "sparse_calls", "sparsity"} <= set(v1)
    assert [(r["model"], r["layers"], r["variant"], r["mode"]) for r in (eager, v1)] == [
        ("Wan2.1-1.3B", 2, "eager", "eager"), ("Wan2.1-1.3B", 2, "rf_v1", "default")]  # fmt: skip

    # WanPipeline's schedule, built here: UniPC on flow sigmas at shift 3.0; the first 10% of the steps dense.
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(num_steps)
    timesteps, warmup = scheduler.timesteps.tolist(), math.ceil(0.1 * num_steps)
    for record in (eager, v1):
        assert record["timesteps"] == [timesteps[0], *timesteps[warmup + 1 : warmup + 1 + steps]]
        assert (record["num_steps"], record["warmup_steps"]) == (num_steps, warmup)
        assert len(record["ms_steps"]) == 1 + steps and record["dense_ms"] == record["ms_steps"][0]
    # A video: eager's every step at its step time; v1's warm-up at its dense step, the rest at its sparse step.
    assert eager["ms_per_step"] == statistics.median(eager["ms_steps"])
    assert eager["video_s"] == pytest.approx(num_steps * eager["ms_per_step"] / 1e3)
    assert v1["ms_per_step"] == statistics.median(v1["ms_steps"][1:])
    dense, sparse = warmup * v1["dense_ms"], (num_steps - warmup) * v1["ms_per_step"]
    assert v1["video_s"] == pytest.approx((dense + sparse) / 1e3)
    assert v1["speedup_vs_eager"] == pytest.approx(eager["ms_per_step"] / v1["ms_per_step"])
    assert v1["video_speedup_vs_eager"] == pytest.approx(eager["video_s"] / v1["video_s"])
    assert math.isnan(v1["speedup_vs_inductor"])  # no inductor in this run
    # Each site was dense at t[0] (the compiling call, the timed step) and sparse from t[warmup] on (the untimed
    # first sparse call, the timed steps, the profiled one): the device's step clock counted the skipped steps.
    assert (v1["sites"], v1["dense_calls"], v1["sparse_calls"]) == (2, 2 * 2, 2 * (1 + steps + 1))
    assert v1["graph_breaks"] == v1["recompiles"] == 0 and 0 < v1["rel_err"] < 1
    assert v1["rel_err_vs"] == eager["rel_err_vs"] == "eager" and math.isnan(eager["rel_err"])  # no inductor here
    assert "extrapolated" in (tmp_path / "e2e.md").read_text()


def test_e2e_wan14b_is_the_720p_configuration_in_bf16():
    """Wan2.1-14B's full-config entry is issue 23's configuration, built in bf16 (on meta here: no memory)."""
    sys.path.insert(0, str(BENCHMARKS))
    from diffusers import UniPCMultistepScheduler
    from e2e import CONFIGS, MODELS

    from rf_compile.presets import build_preset

    spec = MODELS["wan14b"]
    assert "wan14b" in CONFIGS["full"] and (spec.name, spec.batch) == ("Wan2.1-14B", 2)
    preset = build_preset(spec.preset, "full", device="meta", dtype=torch.bfloat16, latent=spec.full_latent)
    (layout,) = preset.expected_layouts
    assert (layout.frames, layout.height, layout.width, layout.seq_len) == (21, 45, 80, 75_600)
    config = preset.model.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (40, 40, 128)
    params = list(preset.model.parameters())
    assert 13e9 < sum(p.numel() for p in params) < 15e9 and {p.dtype for p in params} == {torch.bfloat16}
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    scheduler.set_timesteps(50)
    assert torch.equal(spec.timesteps(50), scheduler.timesteps)


def test_e2e_dense_from_inductor_times_no_dense_step(tmp_path, monkeypatch):
    """With --dense-from-inductor a sparse variant times no dense step (its first timed step is after the
    warm-up) and its warm-up is priced at inductor's step of the run. Run in-process with every variant
    uncompiled: what is under test is which steps are timed and how the video is put together."""
    sys.path.insert(0, str(BENCHMARKS))
    import contextlib

    import e2e

    monkeypatch.setattr(e2e, "_compiled", lambda model, *args: contextlib.nullcontext(model))
    argv = ["e2e.py", "--size", "tiny", "--config", "full", "--models", "wan14b", "--variants", "inductor", "rf_v1",
            "--steps", "1", "--num-steps", "20", "--no-profile", "--dense-from-inductor", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    e2e.main()
    inductor, v1 = json.loads((tmp_path / "e2e.json").read_text())["records"]
    schedule = e2e.MODELS["wan14b"].timesteps(20).tolist()
    assert inductor["timesteps"] == [schedule[0], schedule[3]]  # dense step, then the first after 2 warm-up + 1
    assert v1["timesteps"] == [schedule[3]] and v1["dense_from"] == "inductor"
    assert v1["dense_ms"] == inductor["ms_per_step"] and v1["ms_per_step"] == v1["ms_steps"][0]
    assert v1["video_s"] == pytest.approx((2 * v1["dense_ms"] + 18 * v1["ms_per_step"]) / 1e3)
    assert "dense_from" not in inductor


def test_crossover_grids_records_and_files(tmp_path):
    """The sweep's grids hold the token counts they are named by, at Wan's patch size; its files carry the
    issue's record fields, with speed-ups against inductor of the same model and length."""
    sys.path.insert(0, str(BENCHMARKS))
    from crossover import GRIDS, inputs_at, write

    assert all(f * h * w == n for n, (f, h, w) in GRIDS.items()) and min(GRIDS) <= 1024 and max(GRIDS) >= 120_000
    (layout,) = inputs_at("wan1.3b", 6912, 1, "meta", torch.bfloat16).expected_layouts
    assert (layout.frames, layout.height, layout.width) == (3, 48, 48)

    def record(variant, tokens, ms, **extra):
        return {"model": "M", "layers": 2, "seq_len": tokens, "video_tokens": tokens, "heads": 12, "head_dim": 128,
                "variant": variant, "ms_per_step": ms, **extra}  # fmt: skip

    records = [record("inductor", 1024, 2.0), record("rf", 1024, 2.0, decision="dense", est_ratio=3.0, reason="r"),
               record("rf_sparse", 1024, 4.0), record("inductor", 32760, 10.0), record("rf", 32760, 5.0)]
    write(records, {"gpu": "test"}, tmp_path, "crossover")
    saved = json.loads((tmp_path / "crossover.json").read_text())["records"]
    fields = {"seq_len", "heads", "head_dim", "variant", "ms_per_step", "speedup_vs_inductor"}
    assert all(fields <= set(r) for r in saved)
    assert [r["speedup_vs_inductor"] for r in saved] == [1.0, 1.0, 0.5, 1.0, 2.0]
    assert "| M | 12 | 128 | 1024 | 1024 | rf | 2.000 | 1.000 | dense | 3.000 | r |" in (
        tmp_path / "crossover.md").read_text()
    assert (tmp_path / "crossover.png").stat().st_size > 0


def test_e2e_speedups_pair_records_of_one_model_depth_sequence_compilation_and_mode():
    sys.path.insert(0, str(BENCHMARKS))
    from e2e import add_speedups

    def record(variant, mode, ms, video, **group):
        return {"model": "M", "layers": 4, "seq_len": 100, "regional": False, "variant": variant, "mode": mode,
                "ms_per_step": ms, "video_s": video, **group}  # fmt: skip

    records = [
        record("eager", "eager", 12.0, 6.0),
        record("inductor", "default", 10.0, 5.0),
        record("inductor", "reduce-overhead", 8.0, 4.0),
        record("rf_v1", "reduce-overhead", 4.0, 2.5),
        record("rf_v1", "default", 5.0, 3.0, regional=True),  # no inductor record with regional compilation
    ]
    add_speedups(records)
    eager, inductor, _, v1, regional = records
    assert (eager["speedup_vs_inductor"], eager["video_speedup_vs_inductor"]) == (10 / 12, 5 / 6)
    assert (inductor["speedup_vs_eager"], inductor["speedup_vs_inductor"]) == (12 / 10, 1.0)
    assert (v1["speedup_vs_inductor"], v1["video_speedup_vs_inductor"]) == (8 / 4, 4 / 2.5)  # its own mode
    assert (v1["speedup_vs_eager"], v1["video_speedup_vs_eager"]) == (12 / 4, 6 / 2.5)
    assert all(math.isnan(regional[k]) for k in ("speedup_vs_eager", "video_speedup_vs_inductor"))


def test_e2e_out_of_budget_skips_with_a_note(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    import e2e

    argv = ["e2e.py", "--size", "tiny", "--budget-minutes", "1e-9", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    e2e.main()
    assert not torch._inductor.config.force_disable_caches  # its cache switch does not outlive the run
    assert json.loads((tmp_path / "e2e.json").read_text())["records"] == []
    assert "Skipped (time budget): CogVideoX-5B (every variant), HunyuanVideo (every variant), Wan2.1-14B" in (
        tmp_path / "e2e.md"
    ).read_text()


@pytest.mark.parametrize("script", ["attention.py", "arm.py", "crossover.py", "fixed_cost.py"])
def test_gpu_benchmarks_parse_their_arguments(script):
    result = run(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_plan_stats_counts_masked_blocks_against_the_plan(tmp_path):
    """Recounted from the plan's element mask: the kernel visits exactly the blocks that hold a kept
    score, and takes the masked loop for at least every partial block (it may be conservative, never
    the other way: an unmasked partial block would attend to keys outside the plan)."""
    result = run("plan_stats.py", "--models", "CogVideoX-5B", "--patterns", "mix", "--v2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = json.loads((tmp_path / "plan_stats.json").read_text())["records"]
    assert record["model"] == "CogVideoX-5B" and 0 < record["masked_share"] < 1

    sys.path.insert(0, str(BENCHMARKS.parent))
    from benchmarks.attention import pattern_plan
    from benchmarks.plan_stats import pattern_stats
    from rf_compile.layout import VideoLayout
    from rf_compile.plan import element_mask

    layout, heads = VideoLayout(3, 16, 20, prefix=30), 2  # N = 990: ragged last blocks
    stats = pattern_stats("small", "spatial", masked_cost=2.0, shape=(heads, 64, layout))
    table, _ = pattern_plan("spatial", layout, heads, device="cpu")
    N, bm, bn = layout.seq_len, table.block_m, table.block_n
    mask = torch.nn.functional.pad(element_mask(table, 0), (0, (-N) % bn, 0, (-N) % bm)).int()
    kept = mask.view(-(-N // bm), bm, -(-N // bn), bn).sum((1, 3))
    rows = torch.clamp(N - torch.arange(0, N, bm), max=bm)  # real query rows per block: padding needs no mask
    partial = int(((kept > 0) & (kept < rows[:, None] * bn)).sum()) * heads  # the ragged last key block too
    assert stats["visited_blocks"] == int((kept > 0).sum()) * heads
    masked = round(stats["masked_share"] * stats["visited_blocks"])
    assert partial <= masked < stats["visited_blocks"]
    assert stats["free_mask_saving"] == pytest.approx(1 - stats["visited_blocks"] / (stats["visited_blocks"] + masked))


def test_plan_stats_start_order_runs_each_program_once_text_rows_first_and_shortens_the_tail():
    """The simulated start order (``work_item``'s mapping) lists every (head, query block) once, the text rows of
    every head first; started so, the last programs of a prefix-text layout end together, and a layout without
    text rows starts in launch order."""
    sys.path.insert(0, str(BENCHMARKS.parent))
    from benchmarks.attention import pattern_plan
    from benchmarks.plan_stats import launch_tail, pattern_stats, start_order
    from rf_compile.kernels.block_sparse import plan_extras
    from rf_compile.layout import VideoLayout

    assert launch_tail([1.0] * 8, 4) == 0 and launch_tail([4.0, 1.0, 1.0, 1.0, 1.0], 2) == 0
    assert launch_tail([1.0, 1.0, 1.0, 1.0, 4.0], 2) == pytest.approx(0.5)  # the long one last ends alone
    layout, heads = VideoLayout(4, 16, 24, prefix=300), 3  # N = 1836: 3 query blocks hold text
    table, _ = pattern_plan("density0.2", layout, heads, device="cpu")
    extras = plan_extras(table)
    q_blocks = table.kv_num_blocks.shape[1]
    heavy_first = start_order(extras, heads, "heavy_first")
    assert sorted(heavy_first) == [(h, m) for h in range(heads) for m in range(q_blocks)]
    assert heavy_first[:3 * heads] == [(h, m) for m in range(3) for h in range(heads)]
    assert start_order(extras, heads, "grid") == [(h, m) for h in range(heads) for m in range(q_blocks)]
    stats = pattern_stats("small", "density0.2", masked_cost=1.9, shape=(heads, 64, layout), slots=8)
    assert stats["tail_heavy_first"] < stats["tail_grid"] / 2
    no_text = pattern_stats("small", "density0.2", masked_cost=1.9, shape=(heads, 64, VideoLayout(4, 16, 24)), slots=8)
    assert no_text["tail_heavy_first"] == no_text["tail_grid"]
    v2 = pattern_stats("small", "v2 s=0.8 tiles", masked_cost=1.9, shape=(heads, 64, layout), slots=8)
    assert v2["block_density"] < 0.5 and v2["tail_heavy_first"] < v2["tail_grid"] / 2  # v2's text rows are whole too


@pytest.mark.parametrize("block_m", [128, 64])
def test_fixed_cost_window_plans_walk_exactly_k_whole_blocks(block_m):
    """Every query block of a window plan lists ``k`` consecutive key blocks around its own, none of them the
    ragged last one, the last ``j`` flagged for the mask; the kernel on it equals SDPA over those keys."""
    sys.path.insert(0, str(BENCHMARKS.parent))
    from benchmarks.fixed_cost import window_error, window_table
    from rf_compile.kernels.block_sparse import block_sparse_attention
    from rf_compile.layout import VideoLayout

    layout = VideoLayout(2, 8, 20, prefix=16)  # N = 336: 2 whole key blocks and a ragged one
    N = layout.seq_len
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 64) for _ in range(3))
    for walked, masked in ((0, 0), (1, 0), (2, 0), (2, 1)):
        table = window_table(layout, walked, masked, block_m, "cpu")
        for m in range(table.kv_num_blocks.shape[1]):
            listed = table.kv_indices[0, m, :walked].tolist()
            assert int(table.kv_num_blocks[0, m]) == walked and all(kb < N // 128 for kb in listed)
            assert listed == list(range(listed[0], listed[0] + walked)) if walked else listed == []
            assert walked < 2 or min(m * block_m // 128, 1) in listed  # its own key block, where it is whole
            assert table.block_full[0, m].sum() == walked - masked
        out = block_sparse_attention(q, k, v, table, torch.zeros(1, 2, dtype=torch.int32), loop="split")
        if walked:
            assert window_error(q, k, v, table, out, torch.arange(0, N, 5)) < 1e-5
        else:
            assert out.abs().max() == 0
    with pytest.raises(ValueError, match="do not fit 2 whole key blocks"):
        window_table(layout, 3, 0, block_m, "cpu")


@pytest.mark.gpu
def test_kernel_configs_times_every_kept_configuration_under_every_loop(tmp_path):
    result = run("kernel_configs.py", "--shapes", "CogVideoX-5B", "--patterns", "density0.3", "--rep-ms", "5",
                 "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "kernel_configs.json").read_text())["records"]
    assert {r["loop"] for r in records} == {"split", "masked", "two_pass"} and len({r["config"] for r in records}) >= 2
    timed = [r for r in records if r["ms"] == r["ms"]]
    assert timed and all(0 < r["efficiency"] < 1.5 for r in timed)


def test_fixed_cost_configs_option_keeps_the_named_ones_or_says_which_exist():
    sys.path.insert(0, str(BENCHMARKS.parent))
    from benchmarks.fixed_cost import split_configs
    from benchmarks.utils import config_name

    every = [config_name(c) for c in split_configs(128)]
    assert [config_name(c) for c in split_configs(128, ["w4/s3/ws0/n1", every[-1]])] == [every[-1]]
    with pytest.raises(SystemExit, match=r"none is a launch configuration at d=128; these are: \[.*w8/s3/ws0/n1"):
        split_configs(128, ["w4/s3/ws0/n1"])  # 4 warps at d=128 are pruned (they spill)


def test_attention_summary_lists_every_bf16_form():
    """The attention benchmark's markdown keeps one row per bf16 form of ours (not only the fastest), and no
    8-bit or v2 record among them: an A/B of kernel options is read from that table."""
    sys.path.insert(0, str(BENCHMARKS.parent))
    from benchmarks.attention import summarize

    base = dict(model="Wan2.1-14B", pattern="mix", density=0.45, method="rainfusion", efficiency=0.9, rel_err=0.003,
                config="0:w8/s2/ws0/n1")
    records = [dict(model="Wan2.1-14B", pattern="dense", method="sdpa_cudnn", ms=37.0),
               dict(base, variant="tma/auto/heavy_first/device", ms=18.9),
               dict(base, variant="tma/auto/heavy_first/host", ms=18.6),
               dict(base, variant="tma/auto/heavy_first/host", dtype="fp8", ms=15.0, speedup_vs_bf16=1.24)]
    text = summarize(records)
    forms = text.split("Every bf16 form of ours")[1].split("\n\n")[1]
    assert "| tma/auto/heavy_first/device | 18.900 |" in forms and "| tma/auto/heavy_first/host | 18.600 |" in forms
    assert "15.000" not in forms and len(forms.strip().splitlines()) == 4  # header, rule, two forms


def test_ring_skip_never_skips_a_ring_step_a_head_needs():
    """Against the plan's element mask, token by token: with block-aligned shards a spatial head needs
    exactly the (query shard, key shard) pairs the block count says; permuted heads need no more."""
    sys.path.insert(0, str(BENCHMARKS))
    from ring_skip import needed_pairs

    from rf_compile.config import RainFusionConfig
    from rf_compile.layout import VideoLayout
    from rf_compile.plan import build_plan_table, element_mask, variants_for

    layout, cp = VideoLayout(4, 16, 16), 4  # N = 1024: shards of 256 tokens, two 128-blocks each
    variants = variants_for(RainFusionConfig(bandwidth=0.1))
    table = build_plan_table(layout, variants)
    for p, variant in enumerate(variants):
        mask = element_mask(table, p).view(cp, 256, cp, 256)
        by_tokens = mask.any(3).any(1)
        by_blocks = needed_pairs(table, p, cp)
        assert (by_blocks | ~by_tokens).all(), variant  # a needed step is never skipped
        if variant.pattern.name == "SPATIAL":
            assert torch.equal(by_blocks, by_tokens) and not by_tokens.all()  # the band skips far shards


def test_kernel_resources_compiles_for_sm90_without_a_gpu(tmp_path):
    """Triton compiles the kernel for sm_90 here and cuobjdump reads its registers and stack; the
    unmasked pass of loop="two_pass" is really warp-specialised (partitions add warps) and does not
    spill. A descriptor made from a pointer chosen by an ``if`` once turned the specialisation off
    without a word, leaving the attribute in the IR. With the launcher's descriptors (the default) the other
    launches fence no descriptor of their own; the specialised one makes and fences its own (Triton 3.6
    cannot specialise the host form), so that form must not reach it."""
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}  # conftest sets it for the kernels
    command = [sys.executable, str(BENCHMARKS / "kernel_resources.py"), "--head-dims", "128", "--loops", "unmasked",
               "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=BENCHMARKS, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "kernel_resources.json").read_text())["records"]
    specialised = [r for r in records if "/ws1/" in r["config"]]
    assert specialised and all(r["warp_specialized"] and r["warps"] > 4 and r["stack_bytes"] == 0 for r in specialised)
    for record in records:
        assert record["head_dim"] == 128 and 0 < record["registers"] <= 255 and record["shared_bytes"] > 0
        assert record["warp_specialized"] == ("/ws1/" in record["config"])
        assert record["descriptors"] == "host" and (record["tensormap_fences"] > 0) == record["warp_specialized"]
        # the specialised launch: consumer partitions of 64-row score tiles, with the registers they ask for
        assert (record["mma_tile_rows"] == "64" and record["partition_registers"] != "-") == record["warp_specialized"]


def test_kernel_resources_compiles_a_named_configuration(tmp_path):
    """``--configs`` compiles a configuration the launcher prunes (8 warps, specialised, FP8) and records it under
    its name; a malformed name is refused with the accepted form."""
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(BENCHMARKS / "kernel_resources.py"), "--head-dims", "128", "--loops", "unmasked",
               "--precisions", "fp8", "--out", str(tmp_path), "--configs"]  # fmt: skip
    result = subprocess.run([*command, "w8/s2/ws1/n1"], capture_output=True, text=True, cwd=BENCHMARKS, timeout=600,
                            env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = json.loads((tmp_path / "kernel_resources.json").read_text())["records"]
    assert record["config"] == "w8/s2/ws1/n1" and record["precision"] == "fp8" and record["warps"] >= 8
    bad = subprocess.run([*command, "w8/s2"], capture_output=True, text=True, cwd=BENCHMARKS, timeout=600, env=env)
    assert bad.returncode == 2 and "expected wWARPS/sSTAGES/ws0|ws1/nSPLIT" in bad.stderr


def test_exponentials_under_wgmma_counts_only_while_a_group_is_in_flight():
    """A hand-written PTX order: an exponential after ``wait_group 0`` is not under a product, one after a commit
    or under ``wait_group 1`` (one group may still run) is."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.kernel_resources import exponentials_under_wgmma

    commit, ex2 = "wgmma.commit_group.sync.aligned;", "ex2.approx.ftz.f32 %r1, %r2;"
    wait = "wgmma.wait_group.sync.aligned {};".format
    drained = "\n".join(["wgmma.mma_async.sync.aligned.m64n128k16;", commit, wait(0), ex2])
    assert exponentials_under_wgmma(drained) == 0
    overlapped = "\n".join([commit, "  " + ex2, wait(1), ex2, wait(0), ex2])
    assert exponentials_under_wgmma(overlapped) == 2


def test_wgmma_overlap_compiles_both_toy_loops_for_sm90(tmp_path):
    """The probe compiles the plain and the look-ahead loop for sm_90 here; each has its two products (scores,
    then P V) and the softmax's exponentials in its PTX, and the look-ahead loop one product more before them.
    The Gluon loop, whose waits are placed by hand, has the softmax under the next block's product."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="no Gluon Hopper ops in this Triton")
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(BENCHMARKS / "wgmma_overlap.py"), "--precisions", "fp8", "--stages", "2",
               "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=BENCHMARKS, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    plain, ahead, by_hand = json.loads((tmp_path / "wgmma_overlap.json").read_text())["records"]
    assert (plain["loop"], ahead["loop"], by_hand["loop"]) == ("plain", "look-ahead", "look-ahead (Gluon)")
    assert by_hand["ex2_under_wgmma"] > 0 and by_hand["ptx_events"].index("EX2") < by_hand["ptx_events"].rindex("WAIT0")
    for record in (plain, ahead):
        assert "EX2" in record["ptx_events"]
    mma_runs = [event for event in ahead["ptx_events"].split() if event.startswith("MMA")]
    assert ahead["ptx_events"].index("EX2") > ahead["ptx_events"].index("MMA") and len(mma_runs) >= 3


def test_block_select_compiles_for_sm90_as_launched(tmp_path):
    """The fused v2 selection compiles for sm_90 at 256 key blocks (Wan 480p) with the divisibility
    hints a launch there gets: with M = 256 specialised, Triton 3.6 crashed lowering its row scans."""
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(BENCHMARKS / "kernel_resources.py"), "--kernel", "block_select", "--blocks", "256",
               "--out", str(tmp_path), "--stem", "select"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=BENCHMARKS, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "select.json").read_text())["records"]
    assert {r["select"] for r in records} == {"topk", "mass"} and all(r["blocks"] == 256 for r in records)


def test_crossover_decision_reads_the_report_where_the_pass_kept_sdpa(monkeypatch):
    """A regional graph too short to pay at any layout keeps SDPA (no op, no stats): the sweep's record must say
    dense, with the report's reason, not sparse."""
    sys.path.insert(0, str(BENCHMARKS))
    from crossover import site_decision

    import rf_compile
    from rf_compile.backend import compiled_graphs
    from rf_compile.ops import cost
    from rf_compile.presets import build_preset

    monkeypatch.setattr(cost, "costs_for", lambda device, kernel: cost.HOPPER)
    preset = build_preset("wan", "tiny")
    torch._dynamo.reset()
    rf_compile.reset()
    since = compiled_graphs()
    preset.model.compile_repeated_blocks(backend="rainfusion", options={"min_video_tokens": 0})
    with torch.no_grad():
        preset.model(*preset.args, **preset.kwargs)
    decision, reason = site_decision(preset.model, since)
    assert decision == "dense" and "whatever the layout" in reason
    preset = build_preset("wan", "tiny")  # the same without the cost model: the op runs sparse, stats say so
    torch._dynamo.reset()
    rf_compile.reset()
    preset.model.compile_repeated_blocks(backend="rainfusion", options={"min_video_tokens": 0, "cost_model": False,
                                                                        "dense_warmup": 0.0})  # fmt: skip
    with torch.no_grad():
        preset.model(*preset.args, **preset.kwargs)
    assert site_decision(preset.model, compiled_graphs()) == ("sparse", "")


def test_stress_two_pass_finds_two_pass_equal_to_split_under_the_interpreter(tmp_path):
    """The stress script's CPU case: every repetition of loop="two_pass" (bf16, fp8, int8) is finite and
    equal to loop="split" up to the output's rounding (on a GPU it counts the runs that are not)."""
    env = {**_env(), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "stress_two_pass.py"), "--cases", "tiny", "--repeats",
                             "2", "--out", str(tmp_path)], capture_output=True, text=True, cwd=BENCHMARKS,
                            timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "stress_two_pass.json").read_text())["records"]
    assert {r["precision"] for r in records} == {"bf16", "fp8", "int8"}
    for record in records:
        assert record["nonfinite_runs"] == 0 and record["worst_rel_vs_split"] < 1e-2, record


@pytest.mark.gpu
def test_gpu_two_pass_never_gives_a_non_finite_output(tmp_path):
    """Every configuration of two_pass's first launch, repeated on fresh inputs at head dims 64 and 128, in
    every precision (the 3-stage specialised launch, pruned since, gave NaN at d=64: stress_two_pass_run1.log).
    8-bit two_pass rounds P against another row maximum than split: a few percent apart."""
    result = run("stress_two_pass.py", "--repeats", "5", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "stress_two_pass.json").read_text())["records"]
    assert records and all(r["repeats"] == 5 for r in records), records  # none skipped for want of resources
    bound = {"bf16": 1e-2, "fp8": 0.08, "int8": 0.06}
    bad = [r for r in records if r["nonfinite_runs"] or r["worst_rel_vs_split"] > bound[r["precision"]]]
    assert not bad, bad


def test_profile_step_reduces_kernel_times_against_a_direct_count():
    """profile_step.py's two reductions: the device time kernels cover (overlaps counted once) and the kernel
    names whose time differs most, against a direct count over a 1 us grid."""
    sys.path.insert(0, str(BENCHMARKS))
    from profile_step import intervals_union, kernel_differences

    spans = [(0.0, 4.0), (2.0, 3.0), (10.0, 12.0), (11.0, 15.0), (20.0, 20.0)]
    grid = sum(any(s <= x + 0.5 < e for s, e in spans) for x in range(30))
    assert intervals_union(spans) == grid == 9
    kernels = lambda **us: {name: {"calls": 1.0, "us": t} for name, t in us.items()}  # noqa: E731
    records = [{"variant": "inductor", "kernels": kernels(gemm=100.0, flash=50.0)},
               {"variant": "rf", "kernels": kernels(gemm=101.0, flash=60.0, copy=5.0)}]  # fmt: skip
    rows = kernel_differences(records, rows=2)
    assert [r["kernel"] for r in rows] == ["flash", "copy"]
    assert rows[1] == {"kernel": "copy", "inductor_us": 0.0, "inductor_calls": 0.0, "rf_us": 5.0, "rf_calls": 1.0}


def test_crossover_times_the_variants_in_turns():
    """Two untimed calls of each variant, then rounds of one call of each in turn, as many rounds as ``reps_s``
    of the slowest variant's calls take (3-20): drift over the run falls on every variant alike."""
    sys.path.insert(0, str(BENCHMARKS))
    from crossover import time_in_turns

    order: list[str] = []

    def call(name: str, ms: float):
        return lambda: order.append(name) or ms

    times = time_in_turns({"inductor": call("inductor", 2.0), "rf": call("rf", 5.0)}, reps_s=0.02)
    assert order[:4] == ["inductor", "inductor", "rf", "rf"]
    assert order[4:] == ["inductor", "rf"] * 4  # 20 ms of the 5 ms variant: 4 rounds
    assert times == {"inductor": [2.0] * 4, "rf": [5.0] * 4}
    assert len(time_in_turns({"a": call("a", 1e-4)}, reps_s=10.0)["a"]) == 20
    assert len(time_in_turns({"a": call("a", 1e3)}, reps_s=0.01)["a"]) == 3


def test_crossover_runs_each_variant_on_its_own_copy_in_turns(monkeypatch):
    """``run_shape`` on a tiny Wan (CPU, sites priced as on Hopper): one record per variant and length, each
    variant timed as often as the other, the compiled copies distinct with the same weights, rainfusion's
    decision read from its own copy (dense: too short to pay)."""
    sys.path.insert(0, str(BENCHMARKS))
    import crossover

    from rf_compile.ops import cost
    from rf_compile.presets import build_preset

    monkeypatch.setattr(cost, "costs_for", lambda device, kernel: cost.HOPPER)
    monkeypatch.setitem(crossover.VARIANTS, "rf", {"backend": "rainfusion",
                                                   "options": {**crossover.RF, "min_video_tokens": 0}})  # fmt: skip
    preset = build_preset("wan", "tiny")
    preset.model.eval().requires_grad_(False)
    copies = []
    real_compiled = crossover._compiled
    monkeypatch.setattr(crossover, "_compiled", lambda model, *a: copies.append(model) or real_compiled(model, *a))
    (layout,) = preset.expected_layouts
    records = crossover.run_shape("wan1.3b", ["inductor", "rf"], {layout.seq_len: preset}, reps_s=0.001)
    assert [(r["variant"], r["seq_len"]) for r in records] == [("inductor", 72), ("rf", 72)]
    assert len(records[0]["ms_steps"]) == len(records[1]["ms_steps"]) >= 3
    assert copies[0] is preset.model and copies[1] is not preset.model
    assert all(torch.equal(a, b) for a, b in zip(copies[0].parameters(), copies[1].parameters(), strict=True))
    assert records[1]["decision"] == "dense" and "sparse would be slower" in records[1]["reason"]
    assert "decision" not in records[0]


def test_crossover_reports_a_length_served_by_a_graph_kept_dense_earlier(monkeypatch):
    """After the first length, Dynamo compiles the blocks with a symbolic length; one below the cost model's floor
    keeps SDPA under a guard, and the next length reuses that graph: no op runs and nothing compiles, so its
    record takes the decision of the graph that served it, not "none"."""
    sys.path.insert(0, str(BENCHMARKS))
    import crossover

    from rf_compile.ops import cost
    from rf_compile.presets import build_preset

    monkeypatch.setattr(cost, "costs_for", lambda device, kernel: cost.HOPPER)
    monkeypatch.setitem(crossover.VARIANTS, "rf", {"backend": "rainfusion", "options": {
        **crossover.RF, "min_video_tokens": 0, "compiler": "eager"}})  # fmt: skip
    presets = {}
    for latent in ((3, 8, 12), (2, 8, 8), (8, 8, 8)):  # 72, 32 and 128 tokens, all below Hopper's floor
        preset = build_preset("wan", "tiny", latent=latent)
        (layout,) = preset.expected_layouts
        presets[layout.seq_len] = preset
        preset.model = presets[72].model.eval().requires_grad_(False)
    records = crossover.run_shape("wan1.3b", ["rf"], presets, reps_s=0.001)
    decisions = {r["seq_len"]: (r["decision"], r["reason"]) for r in records}
    assert decisions[72][0] == "dense" and decisions[72][1].startswith("sparse would be slower at 72 tokens")
    assert decisions[32][0] == "dense" and "this graph is guarded to calls shorter than" in decisions[32][1]
    assert decisions[128] == decisions[32]


def test_op_overhead_counts_a_sparse_calls_small_ops_by_stage(tmp_path):
    """op_overhead.py's stages partition the ops it counts, and a sparse call stays within its budget of small
    device ops: v2's tables cost a gather (no per-call sort or launch-order scan), the clock and the call's
    decisions 20 at most (there were 30 before they were fused into fewer ops). Its dense-verdict record times the
    op around SDPA, and ``--graph`` compiles a block three ways and reports the op's share apart from the hook's."""
    command = [sys.executable, str(BENCHMARKS / "op_overhead.py"), "--grid", "2", "8", "16", "--text", "5",
               "--calls", "3", "--graph", "--out", str(tmp_path), "--name", "oo"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = {r["mode"]: r for r in json.loads((tmp_path / "oo.json").read_text())["records"]}
    dense = records.pop("dense verdict, through the dispatcher")
    assert 0 < dense["sdpa_us"] < dense["host_us"] and dense["stages"] == {}
    graph = records.pop("compiled block, in turns")
    calls = graph["calls_us"]
    assert set(calls) == {"inductor", "rainfusion", "rainfusion, no pre-hook"} and min(calls.values()) > 0
    assert graph["op_us"] == calls["rainfusion, no pre-hook"] - calls["inductor"]
    assert set(records) == {"v1 (default)", "v2 (default)"}
    for record in records.values():
        assert sum(record["stages"].values()) == record["ops"] > 0
        assert record["stages"]["step clock"] + record["stages"]["call decisions"] <= 20
    assert records["v2 (default)"]["stages"]["kernel tables"] <= 5  # 261 tokens: a ragged last block
    assert "v1 non-local plans" in records["v1 (default)"]["stages"]
