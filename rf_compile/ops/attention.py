"""``torch.ops.rainfusion.attention``: the op the rewrite pass puts in place of SDPA.

One call = the site's layout for this shape -> device-side decisions (dense warm-up step, ARM
re-run, see ``runtime``) -> ARM (variant per batch element and head) -> block-sparse attention
with each head's plan, where "dense" is one more plan. No host sync, so CUDA graphs capture it.
The op is opaque to inductor (its fake kernel gives it its output shape) and inference-only.
``sparse_attention`` is the same computation as a plain function, for users who call attention
themselves.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.ops import arm, cost, profile, v2
from rf_compile.ops.executors import choose_kernel, run_plan
from rf_compile.ops.masks import full_mask, zero_masked_rows
from rf_compile.ops.runtime.models import SiteState, attach_clock, site_state
from rf_compile.ops.runtime.sites import SiteSpec, get_spec
from rf_compile.plan import Pattern, PlanTable, Variant, build_plan_table, concat_plans, variants_for


def output_like(q: torch.Tensor) -> torch.Tensor:
    """Empty [B, H, N, D] output laid out as (B, N, H, D) memory, the layout SDPA callers reshape for free."""
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2)


def _in_output_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it already has the op's (B, N, H, D)-memory layout, else a copy in it."""
    B, H, N, D = x.shape
    if x.stride() == (N * H * D, D, H * D, 1):
        return x
    return output_like(x).copy_(x)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            "rainfusion attention takes self-attention q, k, v of shape [B, H, N, D] with equal B, H, N; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    layout.check_seq_len(q.shape[-2])
    _refuse_grad(q, k, v)


def _refuse_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "rainfusion attention is inference-only: run the model under torch.no_grad() "
            "or torch.inference_mode()"
        )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    *,
    config: RainFusionConfig | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """RainFusion attention of one call: ARM per head, then each head's sparse pattern.

    Parameters
    ----------
    q, k, v: [B, H, N, D]
        Self-attention inputs over a sequence of ``layout.seq_len`` tokens.
    layout:
        Where the video and text tokens sit.
    config:
        Mode, bandwidth(s), stride, ARM threshold; ``mode="dense"`` computes plain SDPA.
    attn_mask, scale:
        As in ``F.scaled_dot_product_attention`` (masks: key padding, [B|1, 1, 1, N]).

    Returns
    -------
    Tensor [B, H, N, D]
    """
    config = config or RainFusionConfig()
    _check_inputs(q, k, v, layout)
    if config.mode == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    kernel, reason = choose_kernel(config.kernel, q, k, attn_mask, config.precision)
    if not kernel:
        raise ValueError(f"sparse_attention cannot run this call: {reason}")
    if config.mode == "v2":
        table, variant_of_head = v2_plan(q, k, layout, config, scale)
    else:
        table = build_plan_table(layout, variants_for(config), q.device)
        variant_of_head = arm.classify_variants(q, k, layout, config, scale)
        if config.predicts_nonlocal:
            table, variant_of_head = nonlocal_blocks(q, k, layout, config, scale, table, variant_of_head)
    return run_plan(q, k, v, table, variant_of_head, attn_mask, scale, kernel, precision=config.precision)


def nonlocal_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    config: RainFusionConfig,
    scale: float | None,
    static: PlanTable,
    variant_of_head: torch.Tensor,
    progress: torch.Tensor | None = None,
) -> tuple[PlanTable, torch.Tensor]:
    """v1 with ``textural="blocks"`` (its default): heads the ARM sent to the textural variant run a predicted
    block plan instead of the checkerboard.

    Every (batch element, head) gets a v2 plan at ``textural_density`` of the key blocks (at ``progress``
    through the sparse steps, with ``sparsity_ramp``), appended to the static plans; the textural heads'
    variant ids are redirected to theirs (on the device).
    """
    B, H = q.shape[:2]
    blocks = v2.nonlocal_config(config)
    densities = v2.ramp_densities(blocks, progress, H) if progress is not None else None
    predicted = v2.predict_plan(q, k, layout, blocks, scale, densities=densities)
    textural = static.variants.index(Variant(Pattern.TEXTURAL, stride=config.stride))
    own = static.num_plans + torch.arange(B * H, device=q.device).view(B, H)
    return concat_plans(static, predicted), torch.where(variant_of_head == textural, own, variant_of_head)


def v2_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    config: RainFusionConfig,
    scale: float | None,
    dense: torch.Tensor | None = None,
    densities: torch.Tensor | None = None,
) -> tuple[PlanTable, torch.Tensor]:
    """RainFusion 2.0 plan: one variant per (batch element, head); every block where ``dense`` is True;
    ``densities`` (float [H]): each head's share of key blocks instead of ``sparsity``. The plan of each head comes
    as int32, the kernel's index type (no conversion before the launch)."""
    B, H = q.shape[:2]
    table = v2.predict_plan(q, k, layout, config, scale, dense=dense, densities=densities)
    return table, torch.arange(B * H, dtype=torch.int32, device=q.device).view(B, H)


def _dense_call(q, k, v, attn_mask, query_mask, scale) -> torch.Tensor:
    mask = full_mask(attn_mask, query_mask)
    return _in_output_layout(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))


# Defined through ``torch.library.Library`` rather than ``torch.library.custom_op``: the latter's Python autograd
# wrapper, redispatch and aliasing check cost ~13 us a call on the CI CPU against ~5 here (+3 for the autograd
# kernel below), and every call of every site pays it, dense ones included.
_LIBRARY = torch.library.Library("rainfusion", "DEF")
_LIBRARY.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? query_mask, Tensor? timestep, "
    "Tensor? owner, float? scale, str site, SymInt[] sizes) -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag,),
)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    query_mask: torch.Tensor | None,
    timestep: torch.Tensor | None,
    owner: torch.Tensor | None,
    scale: float | None,
    site: str,
    sizes: list[int],
) -> torch.Tensor:
    """The rewritten SDPA site ``site`` (registered by the rewrite pass).

    ``attn_mask``: a key-padding mask [B|1, 1, 1, N] or None; ``query_mask``: the row factor
    [B|1, 1, N, 1] of an outer-product mask, or None. ``timestep`` drives the dense warm-up,
    ``owner`` (a parameter of the compiled model) selects the model instance's state, and
    ``sizes`` are the graph's symbolic sizes for this call (empty when its shapes are static).
    """
    spec = get_spec(site)
    state = site_state(spec, owner)
    if spec.config.mode == "dense":
        return _dense_call(q, k, v, attn_mask, query_mask, scale)
    shape_key = (tuple(sizes), q.shape, k.shape, v.shape, q.dtype, q.device,
                 None if attn_mask is None else attn_mask.shape)  # fmt: skip
    reason = spec.dense_verdict(shape_key)  # a shape judged dense before: one lookup, nothing priced again
    if reason is None:
        layout, kernel, reason = _layout_and_kernel(spec, state, q, k, v, attn_mask, sizes)
        if reason:
            spec.remember_dense(shape_key, reason)
    if reason:  # no layout or kernel for this call, or the cost model expects sparse to be slower at its shape
        state.note_dense(reason)
        return _dense_call(q, k, v, attn_mask, query_mask, scale)

    if timestep is None and not state.model.clock_checked:
        attach_clock(state)
    config = spec.config
    prepare = lambda variants: _prepare(q, layout, config, variants, kernel, state.name)
    call = state.begin(layout, q, timestep, prepare)
    shape = call.shape
    sparse = (~call.dense).double()
    if config.mode == "calibrate":
        dense = _dense_call(q, k, v, attn_mask, query_mask, scale)
        _measure_candidates(q, k, v, layout, config, scale, kernel, attn_mask, query_mask, dense, shape, sparse)
        return dense
    out = output_like(q)
    if config.mode == "v2":
        densities = shape.prepared  # a profile's per-head densities, or None: ``sparsity``
        if call.progress is not None:
            densities = v2.ramp_densities(config, call.progress, q.shape[1])
        table, variant_of_head = v2_plan(q, k, layout, config, scale, dense=call.dense, densities=densities)
        density = table.density(torch.float64).view(q.shape[:2])  # plans are (batch element, head) in order
        shape.block_density_sums.addcmul_(density.sum(0), sparse)
        shape.kept.addcmul_(density.sum(), sparse)
        shape.sparse_heads.add_(sparse, alpha=density.numel())
    else:
        table = shape.prepared
        new_variant, new_recall = arm.decide(q, k, layout, config, scale, enabled=call.run_arm)
        shape.variant.copy_(torch.where(call.run_arm, new_variant, shape.variant))
        shape.recall.copy_(torch.where(call.run_arm, new_recall, shape.recall))
        variant_of_head = shape.variant
        if config.predicts_nonlocal:
            table, variant_of_head = nonlocal_blocks(q, k, layout, config, scale, table, variant_of_head,
                                                     call.progress)
        _record(shape, sparse, table, variant_of_head)
        variant_of_head = torch.where(call.dense, len(shape.variants) - 1, variant_of_head)
    out = run_plan(q, k, v, table, variant_of_head, attn_mask, scale, kernel, out, config.precision)
    out = zero_masked_rows(out, query_mask)
    if config.measure_error:
        _record_error(shape, sparse, out, _dense_call(q, k, v, attn_mask, query_mask, scale))
    return out


def _layout_and_kernel(
    spec: SiteSpec, state: SiteState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attn_mask: torch.Tensor | None, sizes: list[int],
) -> tuple[VideoLayout | None, str, str]:  # fmt: skip
    """(layout, kernel, "") of a call the site can run sparse, or (None | layout, "", why it stays dense)."""
    if k.shape[-2] != q.shape[-2]:  # lengths only known per call (data-dependent) turned out different
        return None, "", f"cross-attention at this call (query length {q.shape[-2]}, key length {k.shape[-2]})"
    model = state.model.module() if state.model.module is not None else None
    layout = spec.layout_for(tuple(sizes), model, q.shape[-2])
    if isinstance(layout, str):
        return None, "", layout
    _check_inputs(q, k, v, layout)
    kernel, reason = choose_kernel(spec.config.kernel, q, k, attn_mask, spec.config.precision)
    return layout, kernel, reason if not kernel else (cost.dense_reason(spec.config, layout, q, kernel) or "")


@functools.lru_cache(maxsize=64)
def candidate_config(config: RainFusionConfig, density: float) -> RainFusionConfig:
    """The v2 settings of one calibration candidate: ``density`` of the key blocks, forced ones included."""
    return dataclasses.replace(config, mode="v2", sparsity=1.0 - density)


def _measure_candidates(q, k, v, layout, config, scale, kernel, attn_mask, query_mask, dense, shape, sparse) -> None:
    """mode="calibrate": each candidate density's relative error per head against ``dense``, on the device."""
    B, H = q.shape[:2]
    for c, density in enumerate(config.candidates):
        table, variant_of_head = v2_plan(q, k, layout, candidate_config(config, density), scale)
        out = zero_masked_rows(run_plan(q, k, v, table, variant_of_head, attn_mask, scale, kernel), query_mask)
        shape.candidate_errors[:, c] += relative_error(out, dense).sum(0) * sparse
    shape.sparse_heads.add_(sparse * (B * H))


def _prepare(
    q: torch.Tensor, layout: VideoLayout, config: RainFusionConfig, variants: tuple, kernel: str, site: str
) -> PlanTable | torch.Tensor | None:
    """What a site keeps per (layout, batch size), built once with its state (outside CUDA-graph pools):
    v1's plan table with its cached densities and kernel tensors, and with predicted non-local heads their
    v2 per-layout tensors; v2's per-layout tensors (cached in v2) and, with a calibration profile, its
    heads' block densities (which also checks the profile)."""
    if config.predicts_nonlocal:
        v2.warm_static(q, layout, v2.nonlocal_config(config))
    if config.mode in ("v2", "calibrate"):
        v2.warm_static(q, layout, config)
        if config.profile is not None and config.mode == "v2":
            return profile.head_densities(config, site, layout, q.shape[1], q.device)
        return None
    table = build_plan_table(layout, variants, q.device)
    table.score_density  # noqa: B018  (cached; computing it reads the device once)
    if kernel == "triton":
        from rf_compile.kernels.block_sparse import plan_extras

        plan_extras(table)  # the kernel's per-table tensors, cached on the table
    return table


def _record(shape, sparse: torch.Tensor, table: PlanTable, plan_of_head: torch.Tensor) -> None:
    """Accumulate pattern counts, estimated recalls, the kept fraction and the block density per head
    (``sparse``: 1.0 on sparse calls, 0.0 on dense ones; ``plan_of_head``: each head's row of ``table``)."""
    B, H = shape.variant.shape
    P = len(shape.variants)
    # Counts per (head, variant) as cells of the flat [H, P] table: one_hot's range check would sync, and CUDA's
    # scatter_add_ on more than one dim refuses torch.use_deterministic_algorithms, where index_add_ complies.
    cells = (shape.variant + torch.arange(0, H * P, P, device=shape.variant.device)).flatten()
    shape.variant_counts.view(-1).index_add_(0, cells, sparse.long().expand_as(cells))
    recall = shape.recall.double()
    known = recall == recall  # not NaN (textural heads have no estimate)
    shape.recall_sums.addcmul_(torch.stack((recall.nan_to_num(0.0), known.double()), -1).sum(0), sparse)
    blocks = table.density(torch.float64)[plan_of_head]  # [B, H]
    static = shape.prepared  # v1's plans; rows past them are predicted (their scores are their blocks)
    scores = static.score_density.double()[plan_of_head.clamp(max=static.num_plans - 1)]
    shape.kept.addcmul_(torch.where(plan_of_head < static.num_plans, scores, blocks).sum(), sparse)
    shape.block_density_sums.addcmul_(blocks.sum(0), sparse)
    shape.sparse_heads.add_(sparse, alpha=B * H)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """float64 [B, H]: ``||out - reference|| / ||reference||`` of each (batch element, head) over tokens and dims."""
    reference = reference.float().flatten(2)
    difference = (out.float().flatten(2) - reference).norm(dim=-1)
    return (difference / reference.norm(dim=-1).clamp_min(1e-30)).double()


def _record_error(shape, sparse: torch.Tensor, out: torch.Tensor, reference: torch.Tensor) -> None:
    """Accumulate the relative L2 error of each (batch element, head)'s output against dense attention."""
    error = relative_error(out, reference)
    shape.error_sums[:, 0] += error.sum(0) * sparse
    shape.error_sums[:, 1] += error.shape[0] * sparse


def _inference_only(keyset, q, k, v, *rest):
    """The op's autograd kernel: no gradient can flow through it, so a call that would record one raises (also
    while torch.compile traces a graph that needs gradients); any other call goes straight to the op."""
    _refuse_grad(q, k, v)
    return attention.redispatch(keyset & torch._C._after_autograd_keyset, q, k, v, *rest)


def _fake(q, k, v, attn_mask, query_mask, timestep, owner, scale, site, sizes):
    return output_like(q)


_LIBRARY.impl("attention", _attention, "CompositeExplicitAutograd")
_LIBRARY.impl("attention", _inference_only, "Autograd", with_keyset=True)
torch.library.register_fake("rainfusion::attention", _fake, lib=_LIBRARY)
attention = torch.ops.rainfusion.attention.default
