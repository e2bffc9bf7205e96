"""Square masks that are an outer product of a per-query and a per-key factor (HunyuanVideo 1.5's
padding mask): proved from the graph, run sparse exactly, fully masked rows as SDPA returns them.
Anything else stays dense with a reason."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rf_compile
from rf_compile import RainFusionConfig, VideoLayout, sparse_attention
from rf_compile.backend import compiled_graphs, reports_since
from rf_compile.ops.attention import attention
from rf_compile.ops.runtime.sites import register_site

LAYOUT = VideoLayout(3, 4, 5, suffix=7)  # 67 tokens, text last (padded at its end)
FULL = RainFusionConfig(bandwidth=1.0, alpha=1e-6, dense_warmup=0.0)  # full bands: the plan covers all


def _factors(batch: int, n: int, padded: int, dtype=torch.bool):
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[0, n - padded :] = False
    rows, keys = valid.view(batch, 1, n, 1), valid.view(batch, 1, 1, n)
    if dtype == torch.bool:
        return rows, keys, rows & keys
    neg = torch.tensor(float("-inf"))
    rows_f = torch.where(rows, 0.0, neg) + torch.randn(batch, 1, n, 1)  # finite row offsets change nothing
    keys_f = torch.where(keys, 0.0, neg)
    return rows_f, keys_f, rows_f + keys_f


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["boolean", "additive"])
def test_op_with_row_and_key_factors_equals_sdpa_with_their_product(dtype):
    q, k, v = (torch.randn(2, 3, LAYOUT.seq_len, 16, dtype=torch.float64) for _ in range(3))
    rows, keys, full = _factors(2, LAYOUT.seq_len, padded=4, dtype=dtype)
    rows, keys, full = (t.double() if t.is_floating_point() else t for t in (rows, keys, full))
    # Full plans: exactly SDPA with the square mask, fully masked rows included (zeros).
    key = register_site(f"outer.full.{dtype}", LAYOUT, FULL)
    out = attention(q, k, v, keys, rows, None, None, None, key, [])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert (out[0, :, -4:] == 0).all() and (expected[0, :, -4:] == 0).all()
    # Sparse plans: the key factor is key padding, masked rows are zero.
    config = RainFusionConfig(dense_warmup=0.0)
    key = register_site(f"outer.sparse.{dtype}", LAYOUT, config)
    out = attention(q, k, v, keys, rows, None, None, None, key, [])
    sparse = sparse_attention(q, k, v, LAYOUT, config=config, attn_mask=keys)
    attending = rows if rows.dtype == torch.bool else torch.isfinite(rows)
    torch.testing.assert_close(out, torch.where(attending, sparse, 0.0), atol=1e-10, rtol=1e-10)


class _PaddedVideo(nn.Module):
    """Conv patches of a video then text, attended under a square mask built like HunyuanVideo 1.5's."""

    def __init__(self, outer: bool = True):
        super().__init__()
        self.patch = nn.Conv3d(4, 16, (1, 2, 2), stride=(1, 2, 2))
        self.qkv = nn.Linear(16, 48)
        self.outer = outer

    def forward(self, x, text, text_mask):
        tokens = torch.cat([self.patch(x).flatten(2).transpose(1, 2), text], dim=1)
        b, n, _ = tokens.shape
        valid = torch.cat([torch.ones(b, n - text.shape[1], dtype=torch.bool), text_mask], dim=1)
        if self.outer:
            mask_1 = valid.view(b, 1, 1, n).repeat(1, 1, n, 1)
            mask = (mask_1 & mask_1.transpose(2, 3)).bool()
        else:  # a mask that depends on query and key together: no outer product
            mask = valid.view(b, 1, 1, n) & (torch.rand(b, 1, n, n) > 0.3)
        q, k, v = self.qkv(tokens).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def _inputs():
    text_mask = torch.ones(2, 7, dtype=torch.bool)
    text_mask[1, -3:] = False
    return torch.randn(2, 4, 3, 8, 10), torch.randn(2, 7, 16), text_mask


def test_outer_product_mask_site_is_sparse_and_exact():
    model = _PaddedVideo().eval()
    args = _inputs()
    start = compiled_graphs()
    options = {"min_video_tokens": 0, "bandwidth": 1.0, "alpha": 1e-6, "dense_warmup": 0.0}
    compiled = torch.compile(model, backend="rainfusion", options=options, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    (site,) = [s for r in reports_since(start) for s in r.sites]
    assert site.status == "sparse" and site.layout == LAYOUT
    # With real sparsity it is sparse (differs from dense) and padded rows stay zero.
    torch._dynamo.reset()
    sparse = torch.compile(model, backend="rainfusion", options={"min_video_tokens": 0, "dense_warmup": 0.0,
                                                                 "textural": "checkerboard"})  # sparse at this size
    with torch.no_grad():
        out = sparse(*args)
    assert (out - model(*args)).abs().max() > 1e-4
    assert (out[1, -3:] == 0).all()


def test_mask_of_query_and_key_together_stays_dense_with_reason():
    model = _PaddedVideo(outer=False).eval()
    report = rf_compile.inspect(model, *_inputs(), options={"min_video_tokens": 0})
    (site,) = report.sites
    assert site.status == "dense"
    assert "attention mask of shape (2, 1, 67, 67)" in site.reason and "outer product" in site.reason
