"""The backend on a hand-written model: site discovery, reasons, rewrite, exactness, options."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import rf_compile
from rf_compile import RainFusionConfig, VideoLayout, sparse_attention
from rf_compile.backend import compiled_graphs, reports_since

LAYOUT = VideoLayout(3, 4, 6, prefix=5)  # 77 tokens


class ToyVideoBlock(nn.Module):
    """Self-attention over [text, video], cross-attention to a context, and a causal attention."""

    def __init__(self, dim=32, heads=2, use_rainfusion=False):
        super().__init__()
        self.heads, self.use_rainfusion = heads, use_rainfusion
        self.qkv = nn.Linear(dim, 3 * dim)
        self.cross_q, self.cross_kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.time = nn.Linear(1, dim)

    def split(self, x, parts):
        B, N, _ = x.shape
        return [t.transpose(1, 2) for t in x.view(B, N, parts, self.heads, -1).unbind(2)]

    def merge(self, x):
        return x.transpose(1, 2).flatten(2)

    def forward(self, x, context, timestep):
        x = x + self.time(timestep[:, None, None].float() / 1000)
        q, k, v = self.split(self.qkv(x), 3)
        if self.use_rainfusion:
            attn = sparse_attention(q, k, v, LAYOUT, config=RainFusionConfig(textural="checkerboard"))  # as OPTIONS
        else:
            attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.merge(attn)
        (cq,) = self.split(self.cross_q(x), 1)
        ck, cv = self.split(self.cross_kv(context), 2)
        x = x + self.merge(F.scaled_dot_product_attention(cq, ck, cv))
        q, k, v = self.split(self.qkv(x), 3)
        return x + self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


def inputs(batch=2, t=400.0):
    return torch.randn(batch, LAYOUT.seq_len, 32), torch.randn(batch, 7, 32), torch.full((batch,), t)


# The paper's v1: its checkerboard is sparse at this tiny size, where predicted 128-token blocks keep every key.
OPTIONS = {"layout": LAYOUT, "min_video_tokens": 0, "dense_warmup": 0.1, "textural": "checkerboard"}


def test_backend_is_registered_by_entry_point():
    assert "rainfusion" in torch._dynamo.list_backends()


def test_sites_are_found_with_reasons():
    model = ToyVideoBlock().eval()
    report = rf_compile.inspect(model, *inputs(), options=OPTIONS)
    assert [s.status for s in report.sites] == ["sparse", "dense", "dense"]
    sparse, cross, causal = report.sites
    assert sparse.layout == LAYOUT and (sparse.heads, sparse.head_dim, sparse.seq_len) == (2, 16, 77)
    assert sparse.kernel == "reference"
    assert cross.reason == "cross-attention (query length 77 != key length 7)"
    assert causal.reason == "causal attention"
    assert sparse.source.startswith("test_backend.py:")
    assert "1 sparse, 2 dense" in report.table()
    assert rf_compile.CompileReport.from_json(report.to_json()) == report


def test_dense_mode_matches_eager_and_counts_rewrites():
    counters.clear()
    model = ToyVideoBlock().eval()
    args = inputs()
    compiled = torch.compile(model, backend="rainfusion", options={**OPTIONS, "mode": "dense"}, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    assert counters["rainfusion"]["sparse_sites"] == 1 and counters["rainfusion"]["dense_sites"] == 2


def test_sparse_mode_matches_the_functional_layer():
    model = ToyVideoBlock().eval()
    reference = ToyVideoBlock(use_rainfusion=True).eval()
    reference.load_state_dict(model.state_dict())
    args = inputs(t=300.0)
    # No dense warm-up: the first call is sparse (warm-up steps are tested below and in test_warmup.py).
    compiled = torch.compile(model, backend="rainfusion", options={**OPTIONS, "dense_warmup": 0.0}, fullgraph=True)
    with torch.no_grad():
        sparse = compiled(*args)
        torch.testing.assert_close(sparse, reference(*args), atol=1e-5, rtol=1e-5)
        assert (sparse - model(*args)).abs().max() > 1e-4  # it really is sparse


def test_eager_compiler_runs_the_same_sparse_graph_without_inductor(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    model = ToyVideoBlock().eval()
    args = inputs(t=300.0)
    options = {**OPTIONS, "dense_warmup": 0.0}
    with torch.no_grad():
        torch._dynamo.reset()
        on_inductor = torch.compile(model, backend="rainfusion", options=options, fullgraph=True)(*args)
        torch._dynamo.reset()
        monkeypatch.setattr(compile_fx_module, "compile_fx", lambda *a, **k: pytest.fail("inductor was called"))
        start = compiled_graphs()
        eager = torch.compile(model, backend="rainfusion", options={**options, "compiler": "eager"}, fullgraph=True)
        out = eager(*args)
    torch.testing.assert_close(out, on_inductor, atol=1e-5, rtol=1e-5)
    assert [s.status for s in reports_since(start)[0].sites] == ["sparse", "dense", "dense"]
    assert (out - model(*args)).abs().max() > 1e-4  # the sparse site ran sparse


def test_warmup_step_is_dense():
    rf_compile.reset()  # the first step of a new video
    model = ToyVideoBlock().eval()
    args = inputs(t=990.0)
    compiled = torch.compile(model, backend="rainfusion", options=OPTIONS, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)


def test_symbolic_shapes_are_sparse_with_the_call_layout():
    model = ToyVideoBlock().eval()
    reference = ToyVideoBlock(use_rainfusion=True).eval()
    reference.load_state_dict(model.state_dict())
    options = {**OPTIONS, "dense_warmup": 0.0}
    compiled = torch.compile(model, backend="rainfusion", options=options, dynamic=True, fullgraph=True)
    start = compiled_graphs()
    with torch.no_grad():
        for batch in (2, 3):  # symbolic batch (1 would be specialised): one graph
            args = inputs(batch=batch)
            torch.testing.assert_close(compiled(*args), reference(*args), atol=1e-5, rtol=1e-5)
    (report,) = reports_since(start)
    site = report.sites[0]
    assert site.status == "sparse" and site.symbolic and site.layout == LAYOUT and site.layout_source == "option"


def test_layout_override_that_fits_nothing_is_an_error():
    model = ToyVideoBlock().eval()
    with pytest.raises(Exception, match=r"matches no self-attention site; their sequence lengths are \[77\]"):
        rf_compile.inspect(model, *inputs(), options={"layout": VideoLayout(2, 2, 2), "min_video_tokens": 0})


def test_unknown_option_is_an_error():
    with pytest.raises(Exception, match="unknown rainfusion option"):
        rf_compile.inspect(ToyVideoBlock().eval(), *inputs(), options={"bandwith": 0.2})


def test_small_sites_stay_dense():
    report = rf_compile.inspect(ToyVideoBlock().eval(), *inputs(), options={"layout": LAYOUT})
    assert report.sites[0].status == "dense"
    assert report.sites[0].reason == "72 video tokens < min_video_tokens=256"


def test_failing_pass_leaves_sites_dense_unless_strict(monkeypatch):
    import rf_compile.backend as backend

    def broken(gm, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(backend, "PASSES", (backend.find_attention, broken, backend.rewrite_sites))
    report = rf_compile.inspect(ToyVideoBlock().eval(), *inputs(), options=OPTIONS)
    self_attention, cross, causal = report.sites
    assert [s.status for s in report.sites] == ["dense"] * 3
    assert self_attention.reason == "pass broken failed: boom"
    assert cross.reason.startswith("cross-attention") and causal.reason == "causal attention"
    with pytest.raises(Exception, match="boom"):
        rf_compile.inspect(ToyVideoBlock().eval(), *inputs(), options={**OPTIONS, "strict": True})
