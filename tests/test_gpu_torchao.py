"""torchao float8 / int8 linear layers under the backend (run on the device machine; needs torchao).

A tiny Wan (head dim 64, the Triton kernel's) has its blocks' linear layers quantized with ``quantize_``;
compiled with the backend, its attention sites must still run sparse (the quantized linears feed q, k, v),
and ``mode="dense"`` must give the quantized model's eager output within low-precision tolerance.
"""

import pytest
import torch

import rf_compile
from rf_compile.presets import build_preset

pytestmark = pytest.mark.gpu


def _quantization(name: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    return {
        "float8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
        "int8_weight_only": Int8WeightOnlyConfig,
    }[name]()


@pytest.mark.parametrize("name", ["float8", "int8_dynamic", "int8_weight_only"])
def test_quantized_linears_keep_the_sites_sparse(name):
    pytest.importorskip("torchao")
    from diffusers import WanTransformer3DModel
    from torchao.quantization import quantize_

    preset = build_preset("wan", batch=2, latent=(5, 16, 24), device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    config = {**preset.model.config, "attention_head_dim": 64, "ffn_dim": 256}
    model = WanTransformer3DModel.from_config(config).to("cuda", torch.bfloat16).eval()
    quantize_(model, _quantization(name), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "blocks." in fqn)
    (layout,) = preset.expected_layouts

    def run(options: dict | None) -> torch.Tensor:
        torch._dynamo.reset()
        rf_compile.reset()
        compiled = model if options is None else torch.compile(model, backend="rainfusion", options=options)
        with torch.no_grad():
            return compiled(*preset.args, **preset.kwargs)[0].float()

    eager = run(None)
    dense = run({"min_video_tokens": 0, "mode": "dense"})
    assert (dense - eager).norm() / eager.norm() < 2e-2
    sparse = run({"min_video_tokens": 0, "dense_warmup": 0.0, "cost_model": False})  # tiny: priced dense
    sites = {k: v for k, v in rf_compile.stats(model).items() if v["calls"]}
    assert len(sites) == preset.self_attention_sites
    assert all(s["layout"] == layout.describe() and s["sparse_calls"] == 1 for s in sites.values())
    assert torch.isfinite(sparse).all() and (sparse - eager).norm() / eager.norm() < 0.5
