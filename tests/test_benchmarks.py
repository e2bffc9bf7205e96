"""The benchmark scripts still run (CPU smoke runs; their GPU numbers come from the device)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, cwd=BENCHMARKS, timeout=600
    )


def test_fidelity_small_run_writes_its_records(tmp_path):
    result = run("fidelity.py", "--small", "--heads", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "fidelity.json").read_text())["records"]
    keys = {"config", "layout", "planted", "accuracy", "recall_estimated", "recall_exact", "rel_l2", "sparsity"}
    assert records and all(keys <= set(r) for r in records)
    assert {r["config"] for r in records} >= {"v1", "v1+", "v2 s=0.8 topk"}
    assert (tmp_path / "fidelity.png").stat().st_size > 0


def test_e2e_tiny_run_writes_its_records(tmp_path):
    result = run(
        "e2e.py", "--size", "tiny", "--models", "wan", "--layers", "1", "--steps", "2",
        "--variants", "eager", "rf_dense", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "e2e.json").read_text())["records"]
    assert [r["variant"] for r in records] == ["eager", "rf_dense"]
    keys = {"model", "variant", "mode", "layers", "ms_per_step", "compile_s", "peak_gib", "attention_share",
            "graph_breaks", "recompiles", "rel_err"}  # fmt: skip
    assert all(keys <= set(r) for r in records)
    assert records[1]["rel_err"] < 1e-4 and records[1]["graph_breaks"] == 0


@pytest.mark.parametrize("script", ["attention.py", "arm.py"])
def test_gpu_benchmarks_parse_their_arguments(script):
    result = run(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout
