"""`make demo`'s summary line, read from the statistics of real op calls."""

import torch

import rf_compile
from rf_compile import RainFusionConfig, VideoLayout
from rf_compile.demo import sparsity_line
from rf_compile.ops.attention import attention
from rf_compile.ops.runtime.sites import register_site


def _stats_after_one_sparse_call(config: RainFusionConfig, name: str) -> dict:
    layout = VideoLayout(3, 4, 6)  # 72 tokens: one 128-token block
    key = register_site(name, layout, config)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    attention(q, k, v, None, None, None, None, None, key, [])
    return {name: rf_compile.stats()[key]}


def test_a_tiny_default_run_says_why_it_keeps_every_block():
    rf_compile.reset()
    line = sparsity_line(_stats_after_one_sparse_call(RainFusionConfig(dense_warmup=0.0), "demo.default"))
    assert line.startswith("sparse calls: sparsity 0.00, key blocks kept 1.00 (") and "checkerboard" in line


def test_the_checkerboard_is_sparse_at_the_same_size_and_needs_no_note():
    rf_compile.reset()
    config = RainFusionConfig(dense_warmup=0.0, textural="checkerboard")
    line = sparsity_line(_stats_after_one_sparse_call(config, "demo.checkerboard"))
    sparsity = float(line.split("sparsity ")[1].split(",")[0])
    assert 0.2 < sparsity < 0.8 and "(" not in line
