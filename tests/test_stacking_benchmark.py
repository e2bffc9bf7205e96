"""benchmarks/stacking.py: its records, on the tiny Wan2.1-1.3B on CPU (its GPU numbers come from the device).

Run in-process with inductor's code generation stubbed out (``compile_fx`` returns the graph's own forward), so
that Dynamo, the backend's passes and diffusers' first-block cache run as on the GPU, in seconds: what is under
test is which combinations run, what they record and that rainfusion's sites run sparse, not inductor.
"""

import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def stacking(monkeypatch):
    """The script's module, with inductor's code generation stubbed and one intra-op thread (the tiny model's
    matrices are too small to share; two threads on a loaded two-core machine made each call 100x slower)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import stacking

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", lambda gm, example_inputs, **kwargs: gm.forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield stacking
    torch.set_num_threads(threads)


def test_stacking_records_every_combination(stacking, tmp_path):
    steps = 4
    stacking.main(["--config", "tiny", "--regional", "--steps", str(steps), "--num-steps", "10",
                   "--out", str(tmp_path)])  # fmt: skip
    saved = json.loads((tmp_path / "stacking.json").read_text())
    records, env = saved["records"], saved["environment"]
    assert [(r["compiler"], r["stack"]) for r in records] == [
        ("inductor", "alone"), ("rainfusion", "alone"), ("inductor", "first_block_cache"),
        ("rainfusion", "first_block_cache"), ("inductor", "torchao_float8"), ("rainfusion", "torchao_float8"),
    ]  # fmt: skip
    for record in records:  # the fields every record carries, skipped or not
        assert (record["model"], record["seq_len"], record["layers"], record["batch"]) == ("Wan2.1-1.3B", 72, 2, 2)
        assert record["regional"] is True and {"status", "reason", "speedup_vs_inductor_alone"} <= set(record)
    timed, float8 = records[:4], records[4:]
    for record in timed:
        assert record["status"] == "ok", record["reason"]
        assert len(record["ms_steps"]) == len(record["timesteps"]) == steps and record["ms_per_step"] > 0
        assert record["compiles_in_loop"] == 0  # the warm-up compiled every path the loop takes
        assert math.isfinite(record["speedup_vs_inductor_alone"]) and record["rel_err_vs_inductor_alone"] < 1
    assert timed[0]["speedup_vs_inductor_alone"] == 1.0 and timed[0]["rel_err_vs_inductor_alone"] == 0.0
    # 10 steps: 1 dense warm-up step, an untimed call at t[1], the loop from t[2] on (every step sparse)
    schedule = stacking.MODELS["wan1.3b"].timesteps(10).tolist()
    assert timed[0]["timesteps"] == schedule[2 : 2 + steps] and timed[0]["warmup_steps"] == 1
    for record in timed[2:]:  # the cache's first loop step always computes; the rest depend on its threshold
        assert record["steps_total"] == steps and 1 <= record["steps_computed"] <= steps
        assert record["fbc_threshold"] == 0.2
    for record in (timed[1], timed[3]):  # rainfusion: both sites sparse on every step, compute or not
        assert record["sites"] == record["sparse_sites"] == 2 and record["sparse_calls"] > 0
    assert all("sparse_sites" not in r and "steps_total" not in r for r in timed[:1])
    for record in float8:  # never on CPU: torchao is missing, or float8 needs a Hopper/Ada GPU
        assert record["status"] == "skipped" and "torchao" in record["reason"]
        assert math.isnan(record["speedup_vs_inductor_alone"])
    assert {"torch", "triton", "diffusers", "torchao", "command"} <= set(env)
    markdown = (tmp_path / "stacking.md").read_text()
    assert "| compiler | stack | ms_per_step |" in markdown and "| rainfusion | first_block_cache |" in markdown


def test_stacking_out_of_budget_skips_with_the_reason(stacking, tmp_path):
    records = stacking.main(["--config", "tiny", "--stacks", "alone", "--budget-minutes", "1e-9",
                             "--out", str(tmp_path)])  # fmt: skip
    assert [(r["compiler"], r["status"]) for r in records] == [("inductor", "skipped"), ("rainfusion", "skipped")]
    assert all(r["reason"].startswith("time budget:") for r in records)
    saved = json.loads((tmp_path / "stacking.json").read_text())["records"]
    assert [r["reason"] for r in saved] == [r["reason"] for r in records]
