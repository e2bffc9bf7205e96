"""The trained fidelity models (benchmarks/fidelity/): sparse quality floor, ARM structure, metrics.

The checkpoint tests load ``benchmarks/fidelity/models/<name>/`` (or ``$RF_FIDELITY_MODELS/<name>``)
at a reduced size (4 frames of 16 x 24 pixels: 384 video tokens) and are skipped when the folder is
missing. Every floor is computed here from real outputs, never stored.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

FIDELITY = Path(__file__).resolve().parent.parent / "benchmarks" / "fidelity"
sys.path.insert(0, str(FIDELITY))

import data  # noqa: E402
import evaluate  # noqa: E402
import models  # noqa: E402
import oracle  # noqa: E402
from metrics import gaussian_window, psnr, ssim  # noqa: E402

import rf_compile  # noqa: E402
from rf_compile import RainFusionConfig, classify_heads  # noqa: E402

MODELS_DIR = Path(os.environ.get("RF_FIDELITY_MODELS", FIDELITY / "models"))
SIZE = dict(frames=4, height=16, width=24)
STEPS = 4


def load(name: str):
    folder = MODELS_DIR / name
    if not (folder / "model_card.json").exists():
        pytest.skip(f"no trained checkpoint at {folder} (made by benchmarks/fidelity/device_train.sh on a GPU)")
    return models.load(folder, name)


def first_available() -> str:
    for name in models.NAMES:
        if (MODELS_DIR / name / "model_card.json").exists():
            return name
    pytest.skip(f"no trained checkpoint under {MODELS_DIR} (made by benchmarks/fidelity/device_train.sh on a GPU)")


# -- metrics -------------------------------------------------------------------------------------


def test_psnr_matches_a_float64_hand_computation():
    a, b = torch.rand(2, 3, 2, 5, 7) * 2 - 1, torch.rand(2, 3, 2, 5, 7) * 2 - 1
    for i in range(2):
        diff = [(float(x) - float(y)) ** 2 for x, y in zip(a[i].flatten(), b[i].flatten())]
        expected = 10 * math.log10(4.0 / (sum(diff) / len(diff)))
        assert psnr(a, b)[i].item() == pytest.approx(expected, rel=1e-9)
    assert torch.isinf(psnr(a, a)).all()


def test_ssim_of_identical_images_is_one_and_of_unrelated_ones_is_small():
    a = torch.rand(2, 3, 3, 20, 24) * 2 - 1
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert (ssim(a, torch.rand_like(a) * 2 - 1) < 0.2).all()


def test_ssim_matches_the_direct_windowed_formula():
    a, b = torch.rand(1, 1, 13, 15), torch.rand(1, 1, 13, 15)
    b = 0.6 * a + 0.4 * b  # correlated, so SSIM is far from 0 and 1
    size, sigma, c1, c2 = 11, 1.5, (0.01 * 2) ** 2, (0.03 * 2) ** 2
    g = [math.exp(-((i - 5) ** 2) / (2 * sigma**2)) for i in range(size)]
    w = [[gi * gj / sum(g) ** 2 for gj in g] for gi in g]
    values = []
    for y0 in range(13 - size + 1):
        for x0 in range(15 - size + 1):
            pa = [float(a[0, 0, y0 + i, x0 + j]) for i in range(size) for j in range(size)]
            pb = [float(b[0, 0, y0 + i, x0 + j]) for i in range(size) for j in range(size)]
            wf = [w[i][j] for i in range(size) for j in range(size)]
            ma, mb = sum(x * y for x, y in zip(wf, pa)), sum(x * y for x, y in zip(wf, pb))
            va = sum(x * (y - ma) ** 2 for x, y in zip(wf, pa))
            vb = sum(x * (y - mb) ** 2 for x, y in zip(wf, pb))
            cov = sum(x * (y - ma) * (z - mb) for x, y, z in zip(wf, pa, pb))
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert ssim(a, b).item() == pytest.approx(sum(values) / len(values), abs=1e-9)
    assert gaussian_window().sum().item() == pytest.approx(1.0)


# -- data and oracle -------------------------------------------------------------------------------


def test_procedural_data_is_deterministic_and_names_its_content():
    a, tokens = data.sample_batch(3, 42, **SIZE)
    b, _ = data.sample_batch(3, 42, **SIZE)
    c, _ = data.sample_batch(3, 43, **SIZE)
    assert a.shape == (3, 3, 4, 16, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and (a[:, :, 1:] - a[:, :, :-1]).abs().mean() > 0.01  # it moves
    assert all(len(text.split()) >= 6 for text in data.describe(tokens))


def _local_heads(layout):
    """q, k [2, 6, N, 64] whose heads are local in space and time at varied strengths (every branch taken)."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, layout.seq_len, 64), torch.randn(2, 6, layout.seq_len, 64)
    pos = torch.zeros(layout.seq_len, 3)
    f, h, w = torch.meshgrid(*(torch.arange(n) for n in (layout.frames, layout.height, layout.width)), indexing="ij")
    pos[layout.video_slice] = torch.stack([f, h, w], -1).reshape(-1, 3).float()
    for head, (sf, ss) in enumerate([(0, 0), (3, 0), (0, 3), (2, 2), (6, 1), (1, 6)]):
        feat = torch.cat([pos[:, :1] * sf, pos[:, 1:] * ss], -1)  # score ~ -|p_i - p_j|^2 / 2
        q[:, head, :, :4] = torch.cat([feat, torch.ones(layout.seq_len, 1)], -1)
        k[:, head, :, :4] = torch.cat([feat, -(feat**2).sum(-1, keepdim=True) / 2], -1)
    return q, k


def test_oracle_rebuilds_the_v1_plus_choice_of_classify_heads():
    layout = models.layout_of("cogvideox", **SIZE)
    q, k = _local_heads(layout)
    config = RainFusionConfig(mode="v1+")
    pattern, bandwidth = oracle.arm_choice(q, k, layout, config)
    assert torch.equal(pattern, classify_heads(q, k, layout, config))
    assert ((pattern == oracle.TEXTURAL) == (bandwidth == 0)).all()


def test_recall_of_the_arm_choice_at_a_bandwidth_float32_cannot_hold():
    """0.18 is not a float32: the ARM's bandwidth must still match the oracle's mask of that bandwidth."""
    layout = models.layout_of("cogvideox", **SIZE)
    q, k = _local_heads(layout)
    config = RainFusionConfig(bandwidth=0.18, alpha=0.8)
    pattern, bandwidth = oracle.arm_choice(q, k, layout, config)
    assert (pattern != oracle.TEXTURAL).any() and (pattern == oracle.TEXTURAL).any()
    recalls = oracle.exact_recalls(q, k, layout, oracle.variants_of(config))  # spatial, temporal, textural
    column = {oracle.SPATIAL: 0, oracle.TEMPORAL: 1, oracle.TEXTURAL: 2}
    index = torch.tensor([column[int(p)] for p in pattern.flatten()]).view_as(pattern)
    chosen = oracle.recall_of(recalls, config, pattern, bandwidth)
    assert torch.equal(chosen, recalls.gather(-1, index[..., None])[..., 0])


# -- trained checkpoints ---------------------------------------------------------------------------


def _stats_sparsity() -> float:
    return evaluate.achieved_sparsity()[1]


@pytest.mark.slow
def test_v1_stays_above_a_floor_computed_from_real_outputs():
    name = first_available()
    model, card = load(name)
    clips, tokens = data.sample_batch(2, evaluate.EVAL_SEED, **SIZE)
    text = models.conditions(tokens, card)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    other = torch.randn(clips.shape, generator=torch.Generator().manual_seed(1))
    dense = models.sample(model, name, noise, text, STEPS)
    dense_other = models.sample(model, name, other, text, STEPS)

    torch._dynamo.reset()
    # num_steps = the loop's steps: the warm-up is its first ceil(0.1 * STEPS) = 1 step
    compiled = torch.compile(model, backend="rainfusion", options={"mode": "v1", "num_steps": STEPS}, dynamic=False)
    rf_compile.reset()
    v1 = models.sample(compiled, name, noise, text, STEPS)
    sparsity = _stats_sparsity()
    assert sparsity > 0.2, f"v1 computed almost dense attention (sparsity {sparsity}): the sparse path did not run"

    # The floor: attention on a random mask of the same density, and another noise seed.
    config, state = RainFusionConfig(num_steps=STEPS), {"step": 0}
    layout = models.layout_of(name, **SIZE)
    hook = evaluate.random_mask_hook(1 - sparsity, layout, lambda: state["step"], config)
    with models.CaptureAttention(hook):
        random_mask = models.sample(model, name, noise, text, STEPS, on_step=lambda i, t: state.update(step=i))
    got = psnr(v1, dense).mean().item()
    random_psnr, other_psnr = psnr(random_mask, dense).mean().item(), psnr(dense_other, dense).mean().item()
    assert got > max(random_psnr, other_psnr), (
        f"{name}: v1 PSNR {got:.2f} dB vs dense (sparsity {sparsity:.2f}) is not above the floor: random mask "
        f"of equal density {random_psnr:.2f} dB, dense with another noise seed {other_psnr:.2f} dB"
    )


@pytest.mark.parametrize("name", models.NAMES)
def test_arm_finds_structure_in_trained_weights_but_not_in_random_ones(name):
    model, card = load(name)
    layout = models.layout_of(name, **SIZE)
    clips, tokens = data.sample_batch(2, evaluate.EVAL_SEED + 1, **SIZE)
    text = models.conditions(tokens, card)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5)
    x = 0.5 * clips + 0.5 * noise

    def textural_share(m) -> float:
        paper = RainFusionConfig(textural="checkerboard")  # the paper's threshold, 0.8
        qkv = models.capture_qkv(m, name, x, t, text)
        picks = torch.cat([classify_heads(q, k, layout, paper) for q, k, _ in qkv])
        return (picks == oracle.TEXTURAL).double().mean().item()

    trained, random = textural_share(model), textural_share(models.build(name).eval())
    assert random >= 0.9, f"{name}: random weights gave {1 - random:.0%} non-textural heads"
    assert trained < 1.0, f"{name}: the ARM picked textural for every head of the trained model"
    assert trained < random


@pytest.mark.slow
def test_evaluate_tiny_run_writes_one_record_per_setting(tmp_path):
    """The evaluation script end to end on the shipped checkpoints (CPU smoke size): the record fields
    the quality tables are built from."""
    import subprocess

    command = [sys.executable, str(FIDELITY / "evaluate.py"), "--tiny", "--models", "wan", "--models-dir",
               str(MODELS_DIR), "--out", str(tmp_path), "--device", "cpu", "--oracle-densities", "0.3,0.7",
               "--block", "32", "--budget-minutes", "30", "--calibrate-densities", "0.6",
               "--calibrate-options", '{"order": "tokens", "candidates": [0.4, 0.7]}']  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=FIDELITY, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "fidelity.json").read_text())["records"]
    assert [(r["mode"], r["setting"]) for r in records] == [
        ("dense", "dense other-noise"), ("oracle", "oracle d=0.3"), ("oracle", "oracle d=0.7"),
        ("v2", "profile density=0.6"), ("v1", "v1"), ("random-mask", "random-mask")]  # fmt: skip
    low, high, v1 = records[1], records[2], records[4]
    profile = json.loads((tmp_path / "profile_wan_density0.6.json").read_text())  # calibrated on held-out inputs
    assert records[3]["options"]["profile"] == str(tmp_path / "profile_wan_density0.6.json")
    assert profile["density"] == 0.6 and profile["mean_density"] <= 0.6 and profile["sites"]
    # 4x8x12 = 384 tokens in 12 blocks of 32: the oracle keeps ceil(12 d) key blocks per query block.
    assert low["block_density"] == pytest.approx(4 / 12) and high["block_density"] == pytest.approx(9 / 12)
    assert high["psnr_db"] > low["psnr_db"]
    assert v1["model"] == "wan" and all(math.isfinite(v1[key]) for key in ("psnr_db", "ssim", "loss_increase"))
    assert 0 < v1["sparsity"] < 1 and 0 <= v1["arm_agreement"] <= 1
    assert 0 < v1["block_density"] <= 1 and 0 < v1["attn_rel_err"] < 1
    at = low["psnr_db"] + (high["psnr_db"] - low["psnr_db"]) * (v1["block_density"] - 4 / 12) / (9 / 12 - 4 / 12)
    assert v1["gap_to_oracle_db"] == pytest.approx(at - v1["psnr_db"])
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_block_oracle_equals_a_brute_force_float64_construction():
    """``oracle.block_mass`` and ``oracle.oracle_blocks`` against sums written out pair by pair in float64:
    per query block the key blocks of most true mass, text blocks first and inside the budget."""
    layout = rf_compile.VideoLayout(2, 3, 5, prefix=3)  # 33 tokens: blocks of 8, the last one ragged
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 33, 8, generator=g, dtype=torch.float64) for _ in range(2))
    block, M = 8, 5
    mass = oracle.block_mass(q, k, block)
    for h in range(2):
        probs = torch.softmax(q[0, h] @ k[0, h].T / math.sqrt(8), -1)
        for i in range(M):
            rows = range(i * block, min(i * block + block, 33))
            for j in range(M):
                expected = sum(float(probs[r, j * block : j * block + block].sum()) for r in rows) / len(rows)
                assert mass[0, h, i, j].item() == pytest.approx(expected, rel=1e-5)
    forced = oracle.text_blocks(layout, block)
    assert forced[0].all() and forced[:, 0].all() and not forced[1:, 1:].any()  # 3 text tokens lie in block 0
    chosen = oracle.oracle_blocks(mass, 0.6, forced)  # ceil(5 * 0.6) = 3 blocks per row, block 0 first
    for h in range(2):
        for i in range(1, M):
            others = mass[0, h, i, 1:].double()
            best = set((others.topk(2).indices + 1).tolist()) | {0}
            assert set(chosen[0, h, i].nonzero().flatten().tolist()) == best
        assert chosen[0, h, 0].all()


def test_step_budget_spends_each_schedules_density_on_its_steps(tmp_path):
    """``step_budget.py`` on the shipped Wan checkpoint at a tiny size: every schedule spends the whole-trajectory
    density it was given (oracle blocks of 32 over 4x8x12 tokens: ceil(12 d) key blocks a row, no text blocks),
    where its dense steps and its sparse steps put it."""
    import subprocess

    command = [sys.executable, str(FIDELITY / "step_budget.py"), "--models", "wan", "--models-dir", str(MODELS_DIR),
               "--out", str(tmp_path), "--device", "cpu", "--frames", "4", "--height", "16", "--width", "24",
               "--batch", "1", "--steps", "4", "--block", "32", "--whole", "0.5",
               "--schedules", "flat1", "flat0", "ramp0_down"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=FIDELITY, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "step_budget.json").read_text())["records"]
    by_name = {r["schedule"]: r for r in records}
    assert list(by_name) == ["flat1", "flat0", "ramp0_down"]
    assert by_name["flat1"]["densities"] == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3], abs=1e-4)
    assert by_name["ramp0_down"]["densities"] == pytest.approx([0.6, 0.5333, 0.4667, 0.4], abs=1e-4)
    # flat1: one dense step, then 4 of 12 blocks; flat0: 6 of 12; ramp0_down: 8, 7, 6, 5 of 12.
    assert by_name["flat1"]["whole_density"] == pytest.approx((1 + 3 * 4 / 12) / 4)
    assert by_name["flat0"]["whole_density"] == pytest.approx(6 / 12)
    assert by_name["ramp0_down"]["whole_density"] == pytest.approx((8 + 7 + 6 + 5) / 48)
    assert all(math.isfinite(r["psnr_db"]) and r["psnr_db"] > 0 for r in records)
    assert "flat0" in (tmp_path / "step_budget.md").read_text()


def test_step_budget_schedules_average_the_budget_and_refuse_densities_outside_0_1():
    import step_budget

    for whole in (0.3, 0.4, 0.6):
        table = step_budget.schedules(20, whole)
        for name, densities in table.items():
            assert sum(densities) / 20 == pytest.approx(whole), name
        step_budget.check_schedules(table, whole)  # every density in (0, 1]: no error
    with pytest.raises(ValueError, match="'ramp2_down' at --whole 0.15 needs per-step densities in"):
        step_budget.check_schedules(step_budget.schedules(20, 0.15), 0.15)


def test_quant_error_emulation_matches_exact_rounding_and_ranks_int8_scores_first():
    """``quant_error.emulate``: without quantization it is attention of bf16-rounded inputs (float64
    check); int8 scores then leave less error than e4m3 scores on peaked rows, and e4m3 scores alone
    account for most of "fp8"'s error (the finding that chose ``precision="int8"``)."""
    import quant_error
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 64, generator=g) for _ in range(3))
    q, k = q * 3.0, k + 2.0  # peaked rows and a shared key offset, as trained heads have
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    rounded = F.scaled_dot_product_attention(*(t.to(torch.bfloat16).double() for t in (q, k, v)))
    floor = quant_error.emulate(q, k, v, "bf16", "block", "bf16", "head").double()
    assert float((floor - rounded).norm() / rounded.norm()) < 5e-3  # only P's bf16 rounding differs

    def error(scheme: str) -> float:
        out = quant_error.emulate(q, k, v, *quant_error.SCHEMES[scheme]).double()
        return float((out - exact).norm() / exact.norm())

    fp8 = error("fp8: e4m3 scores and P V (precision='fp8')")
    int8 = error("int8: int8 scores, K per head, e4m3 P V (precision='int8')")
    assert int8 < 0.6 * fp8, (int8, fp8)
    assert error("e4m3 scores alone") > 2 * error("e4m3 P V alone")
    # Q smoothed: its mean comes back exactly as a per-key bias, so only the centred part is rounded; a large
    # shared offset in q then no longer sets the rounding error of every score
    q_offset = q + 4.0 * torch.randn(64, generator=g)
    exact = F.scaled_dot_product_attention(q_offset.double(), k.double(), v.double())
    raw, smoothed = (quant_error.emulate(q_offset, k, v, "fp8", "block", "bf16", "head", smooth).double()
                     for smooth in (False, True))  # fmt: skip
    raw, smoothed = (float((out - exact).norm() / exact.norm()) for out in (raw, smoothed))
    assert smoothed < 0.7 * raw, (smoothed, raw)
    # the block scale puts each 128-row block's largest |x| on the grid's top
    x = torch.randn(1, 200, 8, generator=g)
    amax = quant_error.block_amax(x)
    assert torch.equal(amax[0, :128, 0], x[0, :128].abs().max().expand(128))
    assert torch.equal(amax[0, 128:, 0], x[0, 128:].abs().max().expand(72))
