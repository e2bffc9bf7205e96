"""The backend on tiny random diffusers video transformers, end to end.

Per model: every video self-attention is rewritten with the layout of the config arithmetic,
the other SDPA calls stay dense with a reason, ``mode="dense"`` equals eager, ``fullgraph=True``
compiles, and the backend compiles exactly the graphs Dynamo would give any backend (no extra
graph break). Mochi's joint attention has a data-dependent text length: compiled as here, without
``capture_dynamic_output_shape_ops``, it breaks the graph and stays dense (test_compile_paths has it sparse).
"""

import collections

import pytest
import torch

from rf_compile.backend import compiled_graphs, reports_since
from rf_compile.presets import PRESETS, build_preset

# The paper's v1: its checkerboard is sparse at these tiny sizes, where predicted 128-token blocks keep every key.
OPTIONS = {"min_video_tokens": 0, "textural": "checkerboard"}
# wan1.3b: its tiny size is the "wan" tiny model (no second compile). hunyuanvideo1.5 breaks the graph on
# data-dependent steps (no fullgraph): test_compile_paths compiles it on both paths.
MODELS = sorted(set(PRESETS) - {"wan1.3b", "hunyuanvideo1.5"})


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result.sample


def _compile_and_run(preset, options, fullgraph=True):
    torch._dynamo.reset()
    start = compiled_graphs()
    compiled = torch.compile(preset.model, backend="rainfusion", options=options, fullgraph=fullgraph)
    with torch.no_grad():
        out = _output(compiled(*preset.args, **preset.kwargs))
    return out, [site for report in reports_since(start) for site in report.sites], len(reports_since(start))


@pytest.fixture(scope="module", params=MODELS)
def model_run(request):
    """Eager output, then the dense-mode and v1 compiles of one tiny preset (CFG batch 2). The dense
    compile goes through inductor (its output must equal eager); the v1 compile runs the rewritten graph
    without inductor (``compiler="eager"``: the same sites and sparse calls, half this module's cold
    compile time), since test_compile_paths and test_pipelines take the sparse op through inductor."""
    name = request.param
    preset = build_preset(name, "tiny", batch=2)
    preset.model.eval()
    with torch.no_grad():
        eager = _output(preset.model(*preset.args, **preset.kwargs))
    fullgraph = name != "mochi"  # Mochi breaks on torch.nonzero (see its preset notes)
    dense, dense_sites, dense_graphs = _compile_and_run(preset, {**OPTIONS, "mode": "dense"}, fullgraph)
    sparse, sites, graphs = _compile_and_run(preset, {**OPTIONS, "dense_warmup": 0.0, "compiler": "eager"}, fullgraph)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(preset.model)(*preset.args, **preset.kwargs)
    return dict(
        name=name, preset=preset, eager=eager, dense=dense, sparse=sparse, sites=sites,
        dense_sites=dense_sites, graphs=graphs, explained=explained,
    )  # fmt: skip


def test_video_self_attention_is_sparse_with_the_config_layout(model_run):
    preset, sites = model_run["preset"], model_run["sites"]
    sparse = [s for s in sites if s.status == "sparse"]
    if model_run["name"] == "mochi":
        assert not sparse
        return
    assert len(sparse) == preset.self_attention_sites
    assert collections.Counter(s.layout for s in sparse) == collections.Counter(preset.expected_layouts)
    assert all(s.kernel == "reference" for s in sparse)  # CPU


def test_other_sites_stay_dense_with_a_reason(model_run):
    preset, sites = model_run["preset"], model_run["sites"]
    dense = [s for s in sites if s.status == "dense"]
    assert all(s.reason for s in dense)
    if model_run["name"] != "mochi":
        assert len(dense) == preset.dense_sites


def test_dense_mode_matches_eager(model_run):
    torch.testing.assert_close(model_run["dense"], model_run["eager"], atol=2e-4, rtol=2e-4)
    assert {s.status for s in model_run["dense_sites"]} == {"dense"}


def test_sparse_mode_runs_and_stays_close(model_run):
    sparse, eager = model_run["sparse"], model_run["eager"]
    assert torch.isfinite(sparse).all()
    rel = ((sparse - eager).norm() / eager.norm()).item()
    assert rel < 0.5, rel
    if model_run["name"] != "mochi":
        assert rel > 1e-6  # the sparse masks really drop scores at these small grids


def test_no_graph_break_beyond_what_dynamo_makes_for_any_backend(model_run):
    assert model_run["graphs"] == model_run["explained"].graph_count
