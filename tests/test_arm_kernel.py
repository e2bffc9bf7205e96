"""The Triton ARM kernels (interpreter on CPU) against the literal reference ARM and float64 definitions."""

import itertools

import pytest
import torch

from rf_compile import Pattern, RainFusionConfig, VideoLayout
from rf_compile.kernels import arm as arm_kernels
from rf_compile.ops import arm
from rf_compile.reference import arm as reference_arm
from rf_compile.reference.synthetic import planted_qk


@pytest.fixture
def triton_arm(monkeypatch):
    monkeypatch.setattr(arm, "_use_triton", lambda q: True)


@pytest.mark.parametrize(
    ("layout", "head_dim", "sample_stride"),
    [
        (VideoLayout(4, 5, 7, prefix=6), 16, None),
        (VideoLayout(3, 9, 10, suffix=5), 64, 2),
        (VideoLayout(2, 6, 13, prefix=3, suffix=2), 128, 5),
        (VideoLayout(4, 4, 6, suffix=8, shards=2), 16, None),  # both samples gathered into one launch
    ],
    ids=str,
)
def test_triton_recalls_equal_reference(triton_arm, layout, head_dim, sample_stride):
    q, k = torch.randn(2, 2, layout.seq_len, head_dim), torch.randn(2, 2, layout.seq_len, head_dim)
    bandwidths = (0.125, 0.25, 0.5)
    fast = arm.arm_recalls(q, k, layout, bandwidths, sample_stride, scale=head_dim**-0.5)
    ref = reference_arm.arm_recalls(q, k, layout, bandwidths, sample_stride, scale=head_dim**-0.5)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=0)


def band_recall_float64(q, k, sample, halfwidths, scale):
    """The sampled recall by its definition, in float64: mean over every r-th query row of the softmax mass
    (over all sampled keys) within ``|position_i - position_j| <= halfwidth`` -> [B, H, nb]."""
    start, stride, count, position_step, r = sample
    tokens = torch.arange(count) * stride + start
    probs = torch.softmax(q[..., tokens, :].double() @ k[..., tokens, :].double().transpose(-1, -2) * scale, -1)
    position = torch.arange(count) * position_step
    rows = torch.arange(0, count, r)
    distance = (position[rows, None] - position[None, :]).abs()
    return torch.stack([(probs[..., rows, :] * (distance <= w)).sum(-1).mean(-1) for w in halfwidths], -1)


def tile_classes(sample, width, block_m, block_n):
    """Which of inside / outside / straddling the tiles of one sample are, for one band (test coverage)."""
    _, _, count, position_step, r = sample
    positions = torch.arange(count) * position_step
    rows = torch.arange(0, count, r)
    classes = set()
    for m in range(0, len(rows), block_m):
        for n in range(0, count, block_n):
            distance = (positions[rows[m : m + block_m], None] - positions[None, n : n + block_n]).abs()
            inside = distance <= width
            classes.add("inside" if inside.all() else "outside" if not inside.any() else "straddling")
    return classes


# (start, stride, count, position_step, row_stride); ragged counts; widths 0 (the diagonal) to beyond S.
SAMPLES = [
    ((3, 1, 45, 4, 1), (2, 3, 37, 3, 1)),
    ((0, 1, 100, 1, 3), (5, 2, 41, 7, 2)),  # query-row subsampling, different per sample
    ((7, 5, 50, 2, 2), (1, 1, 200, 1, 5)),
]
HALFWIDTHS = [0, 9, 30, 70, 400]


@pytest.mark.parametrize("shape", [(16, 16), (32, 16), (16, 32)], ids=str)
@pytest.mark.parametrize("samples", SAMPLES, ids=str)
def test_band_recall_equals_the_float64_definition(monkeypatch, samples, shape):
    monkeypatch.setattr(arm_kernels, "launch_shape", lambda q: (*shape, 1))
    # The case holds every tile class (otherwise the test would prove less).
    classes = set().union(*(tile_classes(sample, w, *shape) for sample in samples for w in HALFWIDTHS[1:4]))
    assert classes == {"inside", "outside", "straddling"}, classes
    q, k = torch.randn(2, 3, 260, 16) * 2, torch.randn(2, 3, 260, 16)
    recalls, variant, recall = arm_kernels.band_recall(q, k, samples, HALFWIDTHS, 0.4, threshold=0.5)
    for i, sample in enumerate(samples):
        expected = band_recall_float64(q, k, sample, HALFWIDTHS, 0.4)
        torch.testing.assert_close(recalls[:, :, i].double(), expected, atol=2e-5, rtol=0)
        # The PyTorch path implements the same sampling.
        torch.testing.assert_close(arm._sampled_recall(q, k, arm.Sample(*sample), HALFWIDTHS, 0.4).double(),
                                   expected, atol=2e-5, rtol=0)  # fmt: skip
    assert torch.equal(variant, arm.choose_variants(recalls[:, :, 0], recalls[:, :, 1], 0.5))


def choose(recall_t, recall_s, threshold):
    """The decision kernel on given recalls [B, H, nb] (one partial block per sample, one row each)."""
    B, H, nb = recall_t.shape
    nb_pad = 1 << (nb - 1).bit_length()
    partial = torch.zeros(B * H, 2, nb_pad)
    partial[:, 0, :nb], partial[:, 1, :nb] = recall_t.reshape(B * H, nb), recall_s.reshape(B * H, nb)
    recalls, variant, recall = torch.empty(B, H, 2, nb), torch.empty(B, H, dtype=torch.long), torch.empty(B, H)
    arm_kernels._choose_kernel[(B * H,)](
        partial, recalls, variant, recall, partial, 1, 2, 1, 1, threshold,
        NB=nb, NB_PAD=nb_pad, BLOCK_P=2, HAS_ENABLED=False,
    )  # fmt: skip
    assert torch.equal(recalls, torch.stack([recall_t, recall_s], 2))
    return variant, recall


@pytest.mark.parametrize("nb", [1, 3])
def test_decision_kernel_equals_choose_variants_including_ties(nb):
    # Every count of failing bands per sample, passing exactly at the threshold (>= passes) or above,
    # then random levels in any order.
    def bands(failing, passing):
        return [0.5] * failing + [passing] * (nb - failing)

    cases = list(itertools.product(range(nb + 1), range(nb + 1), (0.9, 0.95)))
    generator = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.5, 0.9, 0.95])
    recall_t = torch.cat([torch.tensor([[bands(t, p) for t, _, p in cases]]),
                          levels[torch.randint(0, 3, (1, 24, nb), generator=generator)]], 1)  # fmt: skip
    recall_s = torch.cat([torch.tensor([[bands(s, p) for _, s, p in cases]]),
                          levels[torch.randint(0, 3, (1, 24, nb), generator=generator)]], 1)  # fmt: skip
    variant, recall = choose(recall_t, recall_s, 0.9)
    expected = arm.choose_variants(recall_t, recall_s, 0.9)
    assert torch.equal(variant, expected)
    assert set(expected.unique().tolist()) == set(range(2 * nb + 1))  # every variant occurs
    table = torch.cat([recall_s, recall_t, torch.full_like(recall_t[..., :1], float("nan"))], -1)
    torch.testing.assert_close(recall, table.gather(-1, expected[..., None]).squeeze(-1), equal_nan=True)


@pytest.mark.parametrize("mode", ["v1", "v1+"])
@pytest.mark.parametrize("layout", [VideoLayout(4, 6, 8, prefix=5), VideoLayout(4, 4, 6, suffix=8, shards=2)], ids=str)
def test_triton_decide_equals_pytorch_decide(mode, layout):
    q, k = planted_qk(layout, [Pattern.TEMPORAL, Pattern.SPATIAL, Pattern.TEXTURAL, None], head_dim=32, batch=2)
    config = RainFusionConfig(mode=mode, arm_query_rows=7, recall_target=0.6)  # rows subsampled: r = 4 to 7
    torch_variant, torch_recall = arm.decide(q, k, layout, config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(arm, "_use_triton", lambda q: True)
        variant, recall = arm.decide(q, k, layout, config)
    assert torch.equal(variant, torch_variant)
    torch.testing.assert_close(recall, torch_recall, atol=2e-5, rtol=0, equal_nan=True)


def test_triton_arm_classifies_planted_heads(triton_arm):
    layout = VideoLayout(4, 6, 8, prefix=5)
    planted = [Pattern.TEMPORAL, Pattern.SPATIAL, Pattern.TEXTURAL]
    q, k = planted_qk(layout, planted, head_dim=32, batch=2, seed=3)
    variants = arm.classify_variants(q, k, layout, RainFusionConfig())
    assert variants.tolist() == [list(map(int, planted))] * 2


def test_kernels_skip_their_work_when_the_device_flag_is_off():
    q, k = torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16)
    samples = [(0, 1, 40, 3, 1), (40, 1, 40, 3, 2)]
    on = arm_kernels.band_recall(q, k, samples, [4, 9], 0.25, threshold=0.01)
    also_on = arm_kernels.band_recall(q, k, samples, [4, 9], 0.25, threshold=0.01, enabled=torch.tensor(True))
    for a, b in zip(on, also_on):
        torch.testing.assert_close(a, b)
    off = arm_kernels.band_recall(q, k, samples, [4, 9], 0.25, threshold=0.01, enabled=torch.tensor(False))
    assert (off.recalls == 0).all() and (on.recalls > 0).all()
    assert (on.variant == 2).all() and (off.variant == 4).all()  # temporal at the smallest band; off: textural
