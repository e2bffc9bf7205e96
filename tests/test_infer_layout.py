"""Layout inference on Dynamo graphs of the tiny presets, of grid variants, and of synthetic modules.

Every expectation comes from the presets' config arithmetic, never from running the pass.
"""

import collections
import time

import pytest
import torch
import torch.nn.functional as F

from rf_compile.layout import VideoLayout
from rf_compile.passes.infer_layout import graph_dims, infer_site_layout
from rf_compile.passes.symbols import graph_symbols, hint_bindings
from rf_compile.presets import PRESETS, Preset, build_preset


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict, **compile_kwargs) -> list[torch.fx.GraphModule]:
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, **compile_kwargs)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return graphs


def _sites(graphs: list[torch.fx.GraphModule]) -> list[tuple[torch.fx.GraphModule, torch.fx.Node]]:
    return [(gm, n) for gm in graphs for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]


def _infer(graphs: list[torch.fx.GraphModule]) -> tuple[collections.Counter, list[str]]:
    """Inferred layouts (counted) and reasons of every SDPA site of ``graphs``."""
    layouts: collections.Counter = collections.Counter()
    reasons: list[str] = []
    for gm, node in _sites(graphs):
        result = infer_site_layout(gm, node)
        if isinstance(result, VideoLayout):
            layouts[result] += 1
        else:
            assert isinstance(result, str) and result
            reasons.append(result)
    return layouts, reasons


def _capture_preset(preset: Preset) -> list[torch.fx.GraphModule]:
    if preset.name == "mochi":  # one graph instead of 8 breaks on torch.nonzero (see the preset's notes)
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return _capture(preset.model, preset.args, preset.kwargs, fullgraph=True)
    return _capture(preset.model, preset.args, preset.kwargs, fullgraph=True)


# A second grid per model, odd and unlike the default, so inference is not fitted to one size.
VARIANTS = {
    "cogvideox": dict(latent=(4, 10, 6)),
    "cogvideox1.5": dict(latent=(4, 6, 10), batch=2),
    "hunyuanvideo": dict(latent=(2, 10, 14), batch=2),
    "wan": dict(latent=(5, 6, 14), batch=2),
    "ltx": dict(latent=(2, 5, 3)),
}
# HunyuanVideo 1.5 has no single graph (data-dependent graph breaks): its layout comes from the calling
# model's trace (test_parent_trace, test_compile_paths).
CASES = [(name, {}) for name in sorted(set(PRESETS) - {"hunyuanvideo1.5"})]
CASES += [(name, kw) for name, kw in VARIANTS.items()]


@pytest.fixture(scope="module")
def captured() -> dict[str, tuple[Preset, list[torch.fx.GraphModule]]]:
    """Each case's preset and Dynamo graphs, captured once for the module."""
    out = {}
    for name, kwargs in CASES:
        preset = build_preset(name, **kwargs)
        out[f"{name}{kwargs}"] = (preset, _capture_preset(preset))
    return out


@pytest.mark.parametrize(("name", "kwargs"), [c for c in CASES if c[0] != "mochi"], ids=lambda c: str(c))
def test_video_sites_get_the_config_layout(captured, name, kwargs):
    preset, graphs = captured[f"{name}{kwargs}"]
    assert len(graphs) == 1
    layouts, reasons = _infer(graphs)
    assert dict(layouts) == preset.expected_layouts
    assert len(reasons) == preset.dense_sites


def test_wan_and_ltx_cross_attention_is_a_reason(captured):
    for name in ("wan", "ltx"):
        preset, graphs = captured[f"{name}{{}}"]
        _, reasons = _infer(graphs)
        assert len(reasons) == preset.dense_sites
        assert all(reason.startswith("cross-attention: query length 72") for reason in reasons)


def test_hunyuanvideo_token_refiner_is_not_video(captured):
    _, reasons = _infer(captured["hunyuanvideo{}"][1])
    (reason,) = reasons
    assert reason.startswith("not a video sequence") and "10 query tokens" in reason


def test_mochi_text_length_is_read_from_the_call(captured):
    """Mochi's joint text length is data-dependent (unbacked u0): no layout before the call, the
    preset's layout once the call's value of every size symbol is bound."""
    preset, graphs = captured["mochi{}"]
    layouts, reasons = _infer(graphs)
    assert not layouts
    unknown = [r for r in reasons if "not known before the call" in r]
    assert len(unknown) == preset.self_attention_sites
    assert len(reasons) - len(unknown) == preset.dense_sites
    ((gm,),) = [graphs]
    symbols = graph_symbols(gm)
    unbacked = [s for s in symbols if s not in hint_bindings(gm, symbols)]  # one per block
    assert len(unbacked) == preset.self_attention_sites
    text_tokens = int(preset.kwargs["encoder_attention_mask"].sum(-1).max())
    bindings = {**hint_bindings(gm, symbols), **dict.fromkeys(unbacked, text_tokens)}
    found = collections.Counter(infer_site_layout(gm, node, bindings) for gm, node in _sites(graphs))
    assert {k: v for k, v in found.items() if isinstance(k, VideoLayout)} == preset.expected_layouts


def test_regional_compilation_gives_a_reason():
    preset = build_preset("wan")
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    preset.model.compile_repeated_blocks(backend=record, fullgraph=True)
    with torch.no_grad():
        preset.model(*preset.args, **preset.kwargs)
    layouts, reasons = _infer(graphs)
    assert not layouts
    self_attention = [r for r in reasons if not r.startswith("cross-attention")]
    assert self_attention and all("regional compilation" in r and "options={'layout'" in r for r in self_attention)


def test_graph_dims_are_computed_once_per_graph_and_bindings(captured):
    gm, node = _sites(captured["wan{}"][1])[0]
    assert graph_dims(gm) is graph_dims(gm)
    assert graph_dims(gm).dims[node] is not None


def test_full_size_40_layer_graph_is_inferred_within_a_second():
    preset = build_preset("wan", "full", device="meta", dtype=torch.bfloat16)
    graphs = _capture(preset.model, preset.args, preset.kwargs, fullgraph=True)
    start = time.perf_counter()
    layouts, reasons = _infer(graphs)
    assert time.perf_counter() - start < 1.0
    assert dict(layouts) == {VideoLayout(21, 30, 52): 40} and len(reasons) == 40


# -- synthetic modules -------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    """SDPA over tokens made by ``tokens(x)``; q, k, v from one Linear, heads=2."""

    def __init__(self, dim: int = 16, keywords: bool = False):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.keywords = keywords

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        if context is not None:
            k = v = self.qkv(context).view(b, -1, 3, 2, c // 2)[:, :, 1].transpose(1, 2)
        if self.keywords:
            return F.scaled_dot_product_attention(query=q, key=k, value=v)
        return F.scaled_dot_product_attention(q, k, v)


class _Sequence(_Attention):
    """A plain (B, 64, D) sequence: no grid."""

    def forward(self, x):
        return self.attend(x)


class _Image(_Attention):
    """Conv patches of an image: a 2-D grid, one frame."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(4, 16, 2, stride=2)

    def forward(self, x):
        return self.attend(self.patch(x).flatten(2).transpose(1, 2))


class _Video(_Attention):
    """Conv3d patches of a video, then ``text`` tokens after (or before) them."""

    def __init__(self, text_first: bool = False, keywords: bool = False):
        super().__init__(keywords=keywords)
        self.patch = torch.nn.Conv3d(4, 16, (1, 2, 2), stride=(1, 2, 2))
        self.text_first = text_first

    def forward(self, x, text):
        video = self.patch(x).flatten(2).transpose(1, 2)
        parts = [text, video] if self.text_first else [video, text]
        return self.attend(torch.cat(parts, dim=1))


class _TwoGrids(_Attention):
    """The same 48 tokens flattened from a 2x4x6 and from a 4x2x6 grid: ambiguous."""

    def forward(self, a, b):
        return self.attend(a.flatten(1, 3) + b.flatten(1, 3))


class _Cross(_Video):
    def forward(self, x, text):
        return self.attend(self.patch(x).flatten(2).transpose(1, 2), context=text)


def _only_site(module: torch.nn.Module, *inputs: torch.Tensor, **compile_kwargs) -> VideoLayout | str:
    graphs = _capture(module, inputs, {}, fullgraph=True, **compile_kwargs)
    ((gm, node),) = _sites(graphs)
    return infer_site_layout(gm, node)


def test_plain_sequence_is_not_video():
    reason = _only_site(_Sequence(), torch.randn(2, 64, 16))
    assert isinstance(reason, str) and "64 query tokens" in reason and "options={'layout'" in reason


def test_image_grid_is_a_single_frame():
    assert _only_site(_Image(), torch.randn(1, 4, 16, 14)) == VideoLayout(1, 8, 7)


@pytest.mark.parametrize("keywords", [False, True])
def test_video_then_text(keywords):
    layout = _only_site(_Video(keywords=keywords), torch.randn(2, 4, 3, 10, 6), torch.randn(2, 11, 16))
    assert layout == VideoLayout(3, 5, 3, prefix=0, suffix=11)


def test_text_then_video():
    layout = _only_site(_Video(text_first=True), torch.randn(1, 4, 2, 6, 14), torch.randn(1, 5, 16))
    assert layout == VideoLayout(2, 3, 7, prefix=5, suffix=0)


def test_two_grids_for_the_same_tokens_are_ambiguous():
    reason = _only_site(_TwoGrids(), torch.randn(1, 2, 4, 6, 16), torch.randn(1, 4, 2, 6, 16))
    assert isinstance(reason, str) and reason.startswith("ambiguous") and "2x4x6" in reason and "4x2x6" in reason


def test_cross_attention_is_a_reason():
    reason = _only_site(_Cross(), torch.randn(1, 4, 3, 8, 12), torch.randn(1, 7, 16))
    assert reason == "cross-attention: query length 72 != key length 7"


def test_symbolic_graph_is_read_under_the_bindings_of_each_call():
    graphs = _capture(_Video(), (torch.randn(1, 4, 3, 8, 12), torch.randn(1, 7, 16)), {}, fullgraph=True, dynamic=True)
    ((gm, node),) = _sites(graphs)
    reason = infer_site_layout(gm, node)  # no bindings: the symbolic length is not known
    assert isinstance(reason, str) and "not known before the call" in reason
    symbols = graph_symbols(gm)
    hints = hint_bindings(gm, symbols)
    assert infer_site_layout(gm, node, hints) == VideoLayout(3, 4, 6, suffix=7)
    # Another call: 5 frames of 10x6 pixels (5x3 tokens) and 9 text tokens.
    other = {symbol: value for symbol, value in hints.items()}
    by_value = {v: k for k, v in hints.items()}
    other.update({by_value[3]: 5, by_value[8]: 10, by_value[12]: 6, by_value[7]: 9})
    assert infer_site_layout(gm, node, other) == VideoLayout(5, 5, 3, suffix=9)


def test_non_sdpa_node_is_a_reason():
    graphs = _capture(_Sequence(), (torch.randn(1, 8, 16),), {})
    gm = graphs[0]
    placeholder = next(iter(gm.graph.nodes))
    assert "not a call of scaled_dot_product_attention" in infer_site_layout(gm, placeholder)
