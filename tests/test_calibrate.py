"""rf_compile.calibrate and calibration profiles: per-head densities chosen from measured errors, applied
through options={"profile": ...}, refused on another model, site, layout or setting."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import rf_compile
from rf_compile import Pattern, RainFusionConfig, VideoLayout
from rf_compile.calibrate import allocate
from rf_compile.ops import v2
from rf_compile.ops.profile import ProfileError
from rf_compile.reference.synthetic import planted_qk

LAYOUT = VideoLayout(4, 8, 16)  # 512 tokens: 4 key blocks of 128, one per frame
OPTIONS = {"layout": (4, 8, 16), "min_video_tokens": 0, "order": "tokens", "sink_frames": 0,
           "candidates": (0.25, 0.5, 0.75)}  # fmt: skip


class PlantedAttention(torch.nn.Module):
    """One self-attention over a 4x8x16 video whose q/k are planted per head: head 0 attends its own frame
    (local: a quarter of the key blocks hold nearly all of it), head 1 attends every key alike (diffuse)."""

    def __init__(self) -> None:
        super().__init__()
        q, k = planted_qk(LAYOUT, [Pattern.SPATIAL, Pattern.SPATIAL], head_dim=32, seed=4)
        q[:, 1], k[:, 1] = 0.0, torch.randn_like(k[:, 1]) * 0.01  # uniform attention
        self.register_buffer("q", q)
        self.register_buffer("k", k)
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        v = self.proj(hidden_states)  # [1, 2, 512, 32]
        return F.scaled_dot_product_attention(self.q, self.k, v)


def calibrated(tmp_path, target=0.1):
    model = PlantedAttention()
    x = torch.randn(1, 2, LAYOUT.seq_len, 32)
    path = tmp_path / "profile.json"
    profile = rf_compile.calibrate(model, x, timestep=torch.tensor([900.0]), steps=2, target=target, out=path,
                                   options=OPTIONS, progress=False)  # fmt: skip
    return model, x, path, profile


def test_calibration_gives_a_local_head_few_blocks_and_a_diffuse_head_dense(tmp_path):
    _, _, path, profile = calibrated(tmp_path)
    (site,) = profile["sites"].values()
    assert site["layout"] == "4x8x16" and site["heads"] == 2 and site["sparse_calls"] == 2
    local, diffuse = site["candidate_errors"]
    assert local[0] <= 0.1 and site["density"][0] == 0.25  # its own frame: one key block of four
    assert min(diffuse) > 0.1 and site["density"][1] == 1.0  # no candidate reaches the target: dense
    assert json.loads(path.read_text()) == profile
    assert profile["mean_density"] == pytest.approx(0.625)


def test_measured_candidate_errors_equal_v2_at_that_density(tmp_path):
    """The errors the calibration records are those of v2 at each candidate density against SDPA."""
    model, x, _, profile = calibrated(tmp_path)
    (site,) = profile["sites"].values()
    v = model.proj(x).detach()
    dense = F.scaled_dot_product_attention(model.q, model.k, v)
    for c, density in enumerate(OPTIONS["candidates"]):
        config = RainFusionConfig(mode="v2", sparsity=1 - density, order="tokens", sink_frames=0, kernel="reference")
        out = rf_compile.sparse_attention(model.q, model.k, v, LAYOUT, config=config)
        error = ((out - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1))[0]
        assert [errors[c] for errors in site["candidate_errors"]] == pytest.approx(error.tolist(), rel=1e-4)


def test_a_profile_applies_its_per_head_densities(tmp_path):
    model, x, path, profile = calibrated(tmp_path)
    torch._dynamo.reset()
    rf_compile.reset()
    options = {**OPTIONS, "mode": "v2", "profile": str(path), "dense_warmup": 0.0}
    options.pop("candidates")
    compiled = torch.compile(model, backend="rainfusion", options=options)
    with torch.no_grad():
        out = compiled(x, torch.tensor([500.0]))
    (entry,) = [e for e in rf_compile.stats(model).values() if e["sparse_calls"]]
    # 4 key blocks: head 0 keeps one (its diagonal), head 1 all four.
    assert [h["block_density"] for h in entry["heads"]] == pytest.approx([0.25, 1.0])
    v = model.proj(x).detach()
    torch.testing.assert_close(out[0, 1], F.scaled_dot_product_attention(model.q, model.k, v)[0, 1])


def test_a_profile_of_another_model_or_layout_is_refused_naming_the_mismatch(tmp_path):
    _, _, path, profile = calibrated(tmp_path)
    other = {**OPTIONS, "mode": "v2", "profile": str(path), "dense_warmup": 0.0, "layout": (2, 8, 32)}
    other.pop("candidates")
    torch._dynamo.reset()
    compiled = torch.compile(PlantedAttention(), backend="rainfusion", options=other)
    with pytest.raises(ProfileError, match=r"site '.*' was measured at layout 4x8x16, this call has 2x8x32"):
        with torch.no_grad():
            compiled(torch.randn(1, 2, LAYOUT.seq_len, 32), torch.tensor([500.0]))
    renamed = {**profile, "sites": {"blocks.7.attn1": next(iter(profile["sites"].values()))}}
    path.write_text(json.dumps(renamed))
    torch._dynamo.reset()
    compiled = torch.compile(PlantedAttention(), backend="rainfusion", options={**other, "layout": (4, 8, 16)})
    with pytest.raises(ProfileError, match=r"has no site '.*' \(its sites: blocks.7.attn1"):
        with torch.no_grad():
            compiled(torch.randn(1, 2, LAYOUT.seq_len, 32), torch.tensor([500.0]))


def test_a_profile_records_the_block_order_as_resolved():
    """Calibration (tiles unless asked) and v2 (tiles by default) agree on an unset ``order``, and it reads as
    the "tiles" that profiles recorded when the option defaulted to it, so those still apply."""
    from rf_compile.ops.profile import settings_of

    calibrating, applying = RainFusionConfig(mode="calibrate"), RainFusionConfig(mode="v2", profile="p.json")
    assert settings_of(calibrating)["order"] == settings_of(applying)["order"] == "tiles"
    assert settings_of(RainFusionConfig(mode="v2", order="tokens"))["order"] == "tokens"


def test_profile_options_are_checked():
    with pytest.raises(ValueError, match="use it with mode='v2'"):
        RainFusionConfig.from_options({"profile": "p.json"})
    with pytest.raises(ValueError, match="'candidates' must be a fraction"):
        RainFusionConfig.from_options({"candidates": (0.2, 1.5)})
    with pytest.raises(ValueError, match="target must be a relative error"):
        rf_compile.calibrate(PlantedAttention(), target=1.5)


def test_per_plan_budgets_keep_the_forced_then_the_best_blocks():
    """``select_blocks`` with a budget per plan, against a row-by-row reference."""
    g = torch.Generator().manual_seed(0)
    scores = torch.softmax(torch.randn(3, 6, 6, generator=g), -1)
    forced = torch.eye(6, dtype=torch.bool)
    forced[:, 0] = True
    keep = torch.tensor([1, 3, 6], dtype=torch.int32)
    chosen = v2.select_blocks(scores, RainFusionConfig(mode="v2"), forced, keep)
    for p in range(3):
        for row in range(6):
            expected = forced[row].clone()
            free = (~expected).nonzero().flatten()
            extra = max(int(keep[p]) - int(expected.sum()), 0)
            expected[free[scores[p, row, free].topk(extra).indices]] = True
            assert torch.equal(chosen[p, row], expected), (p, row)


def brute_force_allocation(errors, candidates, density):
    """Every combination of choices (dense included): the least summed squared error at mean density <= density."""
    import itertools

    options = [[(1.0, 0.0), *zip(candidates, head)] for head in errors]
    best = None
    for chosen in itertools.product(*options):
        if sum(d for d, _ in chosen) / len(chosen) <= density + 1e-12:
            cost = sum(e * e for _, e in chosen)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("density", [0.3, 0.45, 0.6, 0.8])
def test_a_density_budget_takes_the_least_squared_error_at_that_cost(density):
    """Against brute force over every combination: the allocation's error is optimal for the density it
    reaches (the relaxation's points), never over budget, and within one step of the best under the budget."""
    torch.manual_seed(3)
    candidates = [0.2, 0.4, 0.6]
    # Heads whose error falls fast, slowly, or not at all with density: the budget should go where it pays.
    errors = [[0.5, 0.1, 0.02], [0.3, 0.25, 0.2], [0.05, 0.03, 0.01], [0.8, 0.3, 0.05], [0.2, 0.19, 0.18]]
    chosen = allocate(errors, candidates, density)
    reached = sum(d for d, _ in chosen) / len(chosen)
    assert reached <= density + 1e-9
    cost = sum(e * e for _, e in chosen)
    assert cost == pytest.approx(brute_force_allocation(errors, candidates, reached))
    finest_step = max(e * e for head in errors for e in head)
    assert cost <= brute_force_allocation(errors, candidates, density) + finest_step


def test_retarget_chooses_from_the_kept_errors_without_a_run(tmp_path):
    _, _, path, profile = calibrated(tmp_path, target=0.1)
    again = rf_compile.retarget(path, target=0.1)
    assert again["sites"] == profile["sites"] and again["mean_density"] == profile["mean_density"]
    (site,) = profile["sites"].values()
    local, diffuse = site["candidate_errors"]
    budget = rf_compile.retarget(profile, density=0.5)  # two heads at mean 0.5: the diffuse one gains more
    (chosen,) = budget["sites"].values()
    assert budget["target"] is None and budget["density"] == 0.5 and budget["mean_density"] <= 0.5
    expected = brute_force_allocation([local, diffuse], OPTIONS["candidates"], budget["mean_density"])
    assert sum(e * e for e in chosen["error"]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="below the smallest candidate mix"):
        rf_compile.retarget(profile, density=0.1)
    with pytest.raises(ValueError, match="density must be a mean block density"):
        rf_compile.retarget(profile, density=1.5)
