"""rf-inspect: tables per preset, JSON round trip, --run statistics, the plot, the graph export, errors."""

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

from rf_compile.cli import plot
from rf_compile.cli.inspect import CliError, main, parse_options
from rf_compile.presets import PRESETS, build_preset
from rf_compile.report import CompileReport

SUMMARY = re.compile(r"^(\d+) sparse, (\d+) dense attention sites$", re.MULTILINE)


class TinyVideoAttention(torch.nn.Module):
    """A 5-D video input, a patch embedding, one self-attention: the smallest model with a video site."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Conv3d(channels, dim, kernel_size=1)
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.embed(video).flatten(2).transpose(1, 2)  # (B, F*H*W, dim)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)


def tiny_factory():
    return TinyVideoAttention(), (torch.randn(1, 4, 2, 4, 6),), {}


def no_attention_factory():
    return torch.nn.Linear(4, 4), (torch.randn(2, 4),), {}


def wrong_factory():
    return torch.nn.Linear(4, 4)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def counts(out: str) -> tuple[int, int]:
    match = SUMMARY.search(out)
    assert match, out
    return int(match[1]), int(match[2])


XFAIL = {
    "mochi": "graph breaks at torch.nonzero hide the joint attention from Dynamo",
    "hunyuanvideo1.5": "graph breaks: one block graph serves every block; its layout is found per call, not listed",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=XFAIL[name]) if name in XFAIL else ())
        for name in PRESETS
    ],
)
def test_preset_table(capsys, name):
    preset = build_preset(name, "tiny")
    code, out, _ = run(capsys, name)
    assert code == 0
    assert counts(out) == (preset.self_attention_sites, preset.dense_sites)
    for layout in preset.expected_layouts:
        assert f" {layout.describe()} " in out
    assert "site" in out and "heads x dim" in out and "reason" in out


def test_full_size_captures_on_meta(capsys):
    code, out, _ = run(capsys, "cogvideox", "--size", "full", "--layers", "1")
    assert code == 0
    assert "(full, float32 on meta)" in out
    assert " 17776 " in out and " 48x64 " in out and "13x30x45 +226 text first" in out
    assert counts(out) == (1, 0)


def test_json_round_trips(capsys):
    code, out, _ = run(capsys, "wan", "--json", "--run", "2")
    assert code == 0
    data = json.loads(out)
    report = CompileReport.from_json(out)
    assert json.loads(report.to_json())["sites"] == data["sites"]
    preset = build_preset("wan", "tiny")
    assert (len(report.sparse), len(report.dense)) == (preset.self_attention_sites, preset.dense_sites)
    assert sorted(data["stats"]) == sorted(site.name for site in report.sparse)
    assert all(stats["calls"] == 2 for stats in data["stats"].values())


def test_run_adds_statistics_and_plot(capsys, tmp_path):
    path = tmp_path / "map.png"
    code, out, err = run(capsys, "cogvideox", "--run", "2", "--plot", str(path))
    assert code == 0
    header = out.splitlines()[3]
    for column in ("spatial", "temporal", "textural", "bandwidth", "sparsity", "dense calls"):
        assert column in header
    # Timesteps 999 then 0: the first call is dense warm-up, the second sparse.
    rows = [line for line in out.splitlines() if line.startswith("transformer_blocks.")]
    assert len(rows) == 2 and all(row.rstrip().endswith(" 1/2") for row in rows)
    assert "dense warm-up: the first 1 step(s) of each video (option num_steps: 2 steps)" in out  # --run 2
    assert "denoising steps" in err  # the progress bar
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (plot.FIG_INCHES[0] * plot.DPI, plot.FIG_INCHES[1] * plot.DPI)
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_run_of_v2_shows_its_sparsity_ramp(capsys):
    code, out, _ = run(capsys, "wan", "--run", "2", "--option", "mode=v2")
    line = "sparsity ramp of the predicted blocks: 0.65 at the first sparse step -> 0.95 at the last"
    assert code == 0 and line in out
    code, out, _ = run(capsys, "wan", "--json", "--run", "2", "--option", "mode=v2", "--option", "sparsity_ramp=0")
    assert code == 0 and not any("sparsity_range" in site for site in json.loads(out)["stats"].values())


def test_v1_run_says_what_its_textural_heads_compute(capsys):
    code, out, _ = run(capsys, "wan", "--run", "2")
    assert code == 0 and ("textural heads (neither spatial nor temporal at ARM threshold 0.99): predicted blocks, "
                          "0.42 of the key blocks in tokens order") in out
    code, out, _ = run(capsys, "wan", "--run", "2", "--option", "textural=checkerboard")
    assert code == 0 and "textural heads: the paper's checkerboard, 1 key in 2 (option textural)" in out
    code, out, _ = run(capsys, "wan", "--run", "2", "--option", "mode=v2")
    assert code == 0 and "textural heads" not in out


def test_dominant_patterns():
    heads = [
        {"spatial": 0, "temporal": 0, "textural": 0},
        {"spatial": 1, "temporal": 3, "textural": 0},
        {"spatial": 0, "temporal": 1, "textural": 1},
    ]
    assert plot.dominant_patterns(heads) == [(0, 0.0), (2, 0.75), (2, 0.5)]


@pytest.mark.parametrize("suffix", ["graphml", "dot"])
def test_export_marks_attention_and_layout(capsys, tmp_path, suffix):
    path = tmp_path / f"graph.{suffix}"
    code, _, _ = run(capsys, "cogvideox", "--export", str(path))
    assert code == 0
    if suffix == "dot":
        text = path.read_text()
        assert text.startswith("digraph fx {") and text.rstrip().endswith("}")
        assert text.count('fillcolor="#ff7f0e"') == 2  # the two attention sites
        assert "rainfusion.attention" in text and " -> " in text
        return
    graph = nx.read_graphml(path)
    roles = {name: data["role"] for name, data in graph.nodes(data=True)}
    attention = [name for name, role in roles.items() if role == "attention"]
    assert len(attention) == 2
    assert all("rainfusion.attention" in graph.nodes[name]["target"] for name in attention)
    assert all(graph.nodes[name]["status"] == "sparse" for name in attention)
    layout = [name for name, role in roles.items() if role == "layout"]
    assert any(
        graph.nodes[name]["op"] == "placeholder" and graph.nodes[name]["shape"].count("x") == 4 for name in layout
    )
    assert any("conv2d" in graph.nodes[name]["target"] for name in layout)  # the patch embedding
    assert graph.number_of_edges() > graph.number_of_nodes() // 2


def test_factory(capsys):
    spec = f"{__name__}:tiny_factory"
    code, out, _ = run(capsys, spec)
    assert code == 0 and counts(out) == (0, 1)
    assert "48 video tokens < min_video_tokens=256" in out
    code, out, _ = run(capsys, spec, "--option", "min_video_tokens=0")
    assert code == 0 and counts(out) == (1, 0)
    assert " 2x4x6 " in out and "sparse" in out
    # No timestep input: the warm-up counts calls; with num_steps=50, ceil(0.1 * 50) = 5 > 2, so both
    # runs are dense; by default --run N sets num_steps=N: ceil(0.1 * 2) = 1 dense call.
    code, out, _ = run(capsys, spec, "--option", "min_video_tokens=0", "--option", "num_steps=50", "--run", "2")
    assert code == 0 and "no 'timestep' keyword input" in out
    assert out.splitlines()[5].rstrip().endswith(" 2/2")
    code, out, _ = run(capsys, spec, "--option", "min_video_tokens=0", "--run", "2")
    assert out.splitlines()[5].rstrip().endswith(" 1/2")


def test_parse_options():
    options = parse_options(
        ['mode="v1+"', "bandwidths=[0.5, 0.25]", "recall_target=0.95", "kernel=reference"], "3,4,6,7"
    )
    assert options == {
        "mode": "v1+",
        "bandwidths": [0.5, 0.25],
        "recall_target": 0.95,
        "kernel": "reference",
        "layout": (3, 4, 6, 7),
    }
    with pytest.raises(CliError, match="bad --layout"):
        parse_options([], "3,x,6")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["nope"],
            "unknown preset 'nope'; presets: cogvideox, cogvideox1.5, hunyuanvideo, hunyuanvideo1.5, wan, wan1.3b, "
            "ltx, mochi",
        ),
        (["no_such_package.models:make"], "cannot import 'no_such_package.models:make': No module named"),
        ([f"{__name__}:missing"], f"cannot import '{__name__}:missing': module"),
        ([f"{__name__}:wrong_factory"], "must return (model: nn.Module, args: tuple, kwargs: dict), got Linear"),
        ([f"{__name__}:no_attention_factory"], "no scaled_dot_product_attention call found in the model"),
        (["cogvideox", "--plot", "x.png"], "--plot needs --run"),
        (["cogvideox", "--option", "bandwidth"], "bad --option 'bandwidth': expected KEY=VALUE"),
        (["cogvideox", "--option", "nope=1"], "unknown rainfusion option(s) ['nope']"),
        (["cogvideox", "--option", "bandwidth=2"], "option 'bandwidth' must be a fraction in (0, 1], got 2"),
        (["cogvideox", "--layout", "1,2,3"], "layout option 1x2x3 (6 tokens) matches no self-attention site"),
        (["cogvideox", "--export", "graph.png"], "must end in .graphml or .dot"),
        # diffusers' Mochi calls torch.autocast(device.type): no capture on meta, say so.
        (
            ["mochi", "--size", "full", "--layers", "1"],
            "cannot capture mochi (full, float32 on meta) on the meta device",
        ),
        # HunyuanVideo 1.5 branches on its image embeddings' values: none on meta.
        (
            ["hunyuanvideo1.5", "--size", "full", "--layers", "1"],
            "cannot capture hunyuanvideo1.5 (full, float32 on meta) on the meta device",
        ),
    ],
)
def test_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("rf-inspect: error: ")
    assert message in err


def test_help_of_installed_script():
    script = shutil.which("rf-inspect") or str(Path(sys.executable).with_name("rf-inspect"))
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: rf-inspect")
    assert "examples:" in result.stdout and "--run N" in result.stdout
    assert all(name in result.stdout for name in PRESETS)


def test_calibrate_writes_a_profile_that_the_backend_applies(capsys, tmp_path):
    path = tmp_path / "wan.json"
    assert main(["wan", "--calibrate", str(path), "--run", "2", "--target", "0.2", "--option", "order=tokens"]) == 0
    profile = json.loads(path.read_text())
    assert profile["model"] == "WanTransformer3DModel" and profile["settings"]["order"] == "tokens"
    assert sorted(profile["sites"]) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert f"wrote {path}" in capsys.readouterr().out
    preset = build_preset("wan")
    options = {"mode": "v2", "order": "tokens", "profile": str(path), "min_video_tokens": 0, "dense_warmup": 0.0}
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(preset.model, backend="rainfusion", options=options)(*preset.args, **preset.kwargs)
    assert main(["wan", "--calibrate", str(path), "--target", "2"]) == 2
    assert "target must be a relative error in (0, 1)" in capsys.readouterr().err
    assert main(["wan", "--calibrate", str(path), "--density", "1.5"]) == 2
    assert "density must be a mean block density in (0, 1]" in capsys.readouterr().err
