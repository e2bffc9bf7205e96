"""A peft LoRA in a compiled tiny Wan: unfused (peft's LoRA layers in the graph) and fused into the weights.

The model is compiled with full bands (``bandwidth=1``, ``alpha=1e-6``): the sparse path then computes what
SDPA does, so one compile shows both that every video self-attention site runs sparse and that the output
equals the uncompiled model with the same LoRA.
"""

import pytest
import torch

import rf_compile
from rf_compile.presets import build_preset

OPTIONS = {"min_video_tokens": 0, "dense_warmup": 0.0, "bandwidth": 1.0, "alpha": 1e-6}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_lora_model_is_sparse_and_exact(fused):
    from peft import LoraConfig

    preset = build_preset("wan", batch=2)
    model, (layout,) = preset.model, preset.expected_layouts
    with torch.no_grad():
        base = model(*preset.args, **preset.kwargs)[0]
    # Random (not zero) LoRA weights on the attention projections, so the adapter changes the output.
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    model.add_adapter(config)
    if fused:
        model.fuse_lora()
    with torch.no_grad():
        eager = model(*preset.args, **preset.kwargs)[0]
    assert (eager - base).abs().max() > 1e-3
    torch._dynamo.reset()
    rf_compile.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="rainfusion", options=OPTIONS)(*preset.args, **preset.kwargs)[0]
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    sites = {k: v for k, v in rf_compile.stats(model).items() if v["calls"]}
    assert len(sites) == preset.self_attention_sites
    assert all(s["layout"] == layout.describe() and s["sparse_calls"] == 1 for s in sites.values())
