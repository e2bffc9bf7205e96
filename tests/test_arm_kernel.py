"""The Triton ARM kernel (interpreter on CPU) against the literal reference ARM."""

import pytest
import torch

from rf_compile import Pattern, RainFusionConfig, VideoLayout
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


def test_triton_arm_classifies_planted_heads(triton_arm):
    layout = VideoLayout(4, 6, 8, prefix=5)
    planted = [Pattern.TEMPORAL, Pattern.SPATIAL, Pattern.TEXTURAL]
    q, k = planted_qk(layout, planted, head_dim=32, batch=2, seed=3)
    variants = arm.classify_variants(q, k, layout, RainFusionConfig())
    assert variants.tolist() == [list(map(int, planted))] * 2


def test_kernel_skips_its_work_when_the_device_flag_is_off():
    from rf_compile.kernels.arm import band_recall

    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    on = band_recall(q, k, 3, [4, 9], 0.25)
    torch.testing.assert_close(band_recall(q, k, 3, [4, 9], 0.25, enabled=torch.tensor(True)), on)
    off = band_recall(q, k, 3, [4, 9], 0.25, enabled=torch.tensor(False))
    assert (off == 0).all() and (on > 0).all()
