"""RainFusionConfig: the backend's options, parsed and validated once per compile.

Users pass options as ``torch.compile(model, backend="rainfusion", options={...})``. Our keys
are taken out into a frozen dataclass; every other key is left for inductor. An unknown value
raises ``OptionError`` (a ``ValueError``) naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from rf_compile.layout import VideoLayout

log = logging.getLogger(__name__)

MODES = ("v1", "v1+", "v2", "dense", "calibrate")


class OptionError(ValueError):
    """A ``rainfusion`` option with an unknown key or a value outside what it accepts."""

SELECTIONS = ("topk", "mass")
ORDERS = ("tiles", "tokens")  # v2 blocks: 3-D tiles of the video (RainFusion 2.0) or the model's token order
BUDGETS = ("query_block", "heads", "call")  # v2: whose key blocks share one budget (ops/shared_budget.py)
NONLOCAL = ("checkerboard", "blocks")  # v1 heads the ARM finds neither spatial nor temporal
KERNELS = ("auto", "triton", "reference")
# The attention products: the inputs' dtype, float8 e4m3, or int8 Q K^T with e4m3 P V (the last two on Hopper)
PRECISIONS = ("bf16", "fp8", "int8")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILERS = ("inductor", "eager")  # what runs the rewritten graph
DEFAULT_NUM_STEPS = 50  # steps of a video when neither option num_steps nor a calling pipeline gives them
DEFAULT_RAMP = 0.15  # v2's sparsity ramp (option sparsity_ramp=None): best of 0-0.3 on the trained models
MAX_RAMPED_SPARSITY = 0.99  # the default ramp is narrowed to end at most here
# v1's defaults (README, Quality: "v1's defaults: predicted non-local heads"): the ARM's non-local heads get
# predicted blocks, in the model's token order, at 0.42 of the key blocks (v1's sparsity or more on both
# trained models), and only heads whose band holds 0.99 of the sampled attention keep a band. With the
# paper's checkerboard, 0.8 stays the threshold (best of 0.5-0.97 for that pattern).
ALPHA_CHECKERBOARD = 0.8
ALPHA_BLOCKS = 0.99
TEXTURAL_DENSITY = 0.42


@dataclasses.dataclass(frozen=True)
class RainFusionConfig:
    """Options of the ``rainfusion`` backend.

    Attributes
    ----------
    mode:
        ``"v1"`` RainFusion (one bandwidth for all spatial/temporal heads), ``"v1+"``
        RainFusion+ (per-head bandwidth from ``bandwidths``), ``"v2"`` RainFusion 2.0
        (block-mean prediction over 3-D tiles), ``"dense"`` (rewrite every site but always
        compute dense attention: the exactness check of the pass itself), ``"calibrate"`` (dense
        output; on sparse steps each head's error at every block density of ``candidates`` is
        measured: what ``rf_compile.calibrate`` runs).
    bandwidth:
        v1 band half-width as a fraction of the video tokens, in (0, 1]. 0.25 keeps 7/16 of
        the video-video scores of spatial and temporal heads.
    bandwidths:
        v1+ candidate bandwidths; each head takes the smallest one whose estimated recall
        reaches ``recall_target``.
    recall_target:
        v1+ recall threshold, in (0, 1].
    stride:
        Textural checkerboard stride tau (>= 2): keeps about 1/tau of the video keys.
    alpha:
        v1 recall threshold of the ARM (Algorithm 1), in (0, 1]: a head keeps a band only if the band
        holds this share of its sampled attention. ``None`` (default): 0.99 with ``textural="blocks"``
        (a non-local head loses little there, so only near-certain bands pay), 0.8 with the
        checkerboard (the paper does not state its value; 0.8 was best of 0.5-0.97 for it on both
        trained fidelity models, README, Quality).
    sample_stride:
        omega of the ARM's global sampling (every omega-th video token). ``None`` uses the
        number of frames, so both samples hold about one frame of tokens.
    arm_query_rows:
        Most query rows per ARM sample. A longer sample of S tokens averages the in-band softmax
        mass over every r-th query row, r = ceil(S / arm_query_rows), against all S keys (each
        row's softmax stays exact; the mean is estimated at 1/r of the cost). 384 keeps every row
        of the trained fidelity models' samples (384 tokens) and the tiny presets', and takes
        300-338 rows at CogVideoX, HunyuanVideo and Wan (S = 1200-1560), where it keeps the ARM
        under 0.5% of dense attention on an H200 (512 left CogVideoX at 0.52%). ``None`` takes
        every row.
    dense_warmup:
        Share of the denoising steps kept dense, in [0, 1): the first
        ``ceil(dense_warmup * num_steps)`` steps of each video. Steps are counted on the device
        from the ``timestep`` values (a new value is a new step, a larger one a new video).
    num_steps:
        Steps of the sampling loop, which the warm-up share is taken of. ``None`` (default): the
        calling diffusers pipeline's own count, per video (``ops/runtime/step_count``), else 50.
    arm_every:
        Re-run the ARM every k-th sparse call of a site and reuse its decision in between.
    sparsity:
        v2 fraction of key blocks skipped per query block, in [0, 1). The forced blocks (text and
        sink-frame columns, the diagonal) count inside the budget: a query block keeps at most
        ``ceil(kv_blocks * (1 - sparsity))`` key blocks, forced ones first; only the rows that are
        forced whole (text and sink-frame query blocks) attend densely.
    sparsity_ramp:
        v2: over the sparse steps of each video, the sparsity rises linearly from ``sparsity - sparsity_ramp``
        at the first to ``sparsity + sparsity_ramp`` at the last, so the mean stays ``sparsity``: more blocks
        while the sample is mostly noise, where a missed block costs most. ``0``: the same every step.
        ``None`` (default): 0.15 for v2 with ``budget="query_block"`` and no profile, and for v1 / v1+ with
        ``textural="blocks"``, narrowed to keep both ends in [0, 0.99]; 0 otherwise. A value must keep both
        ends in [0, 1) and needs v2 with ``budget="query_block"`` and no profile, or v1 / v1+ with
        ``textural="blocks"``, whose predicted non-local heads it ramps around their share
        ``textural_density`` (the bands stay as they are).
    select:
        v2 block selection: ``"topk"`` keeps ``ceil(kv_blocks * (1 - sparsity))`` key blocks per
        query block (forced ones included); ``"mass"`` keeps blocks by descending predicted score
        (forced ones first) until ``mass`` of it is covered, never more than ``"topk"`` would.
    mass:
        v2 predicted softmax mass to cover with ``select="mass"``, in (0, 1].
    budget:
        Who shares v2's budget of key blocks (the same total in each case): ``"query_block"`` (default),
        every query block of every head keeps its own ``ceil(kv_blocks * (1 - sparsity))``; ``"heads"``,
        each query block's budget is pooled over the heads of the call; ``"call"``, one budget over every
        head and query block. Pooled budgets keep the blocks of highest predicted probability wherever they
        are (concentrated heads give blocks to diffuse ones); ``select="topk"`` only, PyTorch selection.
    budget_floor:
        With a pooled ``budget``, the share of its per-row budget every query block keeps at least
        (forced blocks included), in (0, 1].
    order:
        Token order that predicted 128-token blocks are cut from: ``"tiles"``, compact 3-D tiles of the
        video (RainFusion 2.0's spatio-temporal permutation, ``tile``), or ``"tokens"``, the model's own
        (frame-major) order, read in place. ``None`` (default): ``"tiles"`` for v2, ``"tokens"`` for the
        predicted heads of v1 / v1+ (0.5 / 1.1 dB better there than tiles on the trained models).
    textural:
        What v1 / v1+ compute for heads the ARM finds neither spatial nor temporal: ``"checkerboard"``
        (the paper's textural pattern, every ``stride``-th key) or ``"blocks"`` (v2's block prediction
        in ``order``, keeping ``textural_density`` of the key blocks). ``None`` (default): ``"blocks"`` for
        v1 (4.4 / 4.3 dB over the checkerboard at more sparsity on the trained models), ``"checkerboard"``
        for v1+ (blocks lost 0.2 / 0.4 dB there at its ``recall_target``).
    textural_density:
        v1 / v1+ with ``textural="blocks"``: the share of key blocks the predicted non-local heads keep, in
        (0, 1]. ``None`` (default): 0.42, where v1's mix of bands and predicted heads is at least as sparse
        as the paper's v1 on both trained models.
    dense_layers:
        The first N video self-attention sites of a model (in the order they are first called) stay
        dense, as Sparse VideoGen and Radial Attention keep their first layers dense.
    dense_last_steps:
        The last N denoising steps of each video (of ``num_steps``: the option, else the pipeline's) are dense.
    profile:
        Path of a calibration profile (JSON written by ``rf_compile.calibrate``): every site runs v2
        with the per-head block densities measured for it on this model. A site the profile does not
        hold, or holds at another layout or head count, raises an error naming it.
    candidates:
        Block densities (v2, ``order``) whose per-head error ``mode="calibrate"`` measures.
    measure_error:
        Also compute dense attention on every sparse call and record the relative L2 error of the
        sparse output per head (``attn_rel_err`` in ``stats()``); doubles the attention cost, for
        evaluation and calibration.
    tile:
        v2 tile (frames, height, width) of one kernel block of 128 tokens; ``None`` picks
        2x8x8 for video and 1x8x16 for images.
    sink_frames:
        v2 first latent frames whose blocks are always attended (rows and columns, inside the budget).
        0 (default): none. RainFusion 2.0 keeps one; on the trained fidelity models it cost 1.6-2.4 dB
        at v2's 0.8 in both orders (README, Quality), since its blocks take the budget of predicted ones.
    layout:
        Explicit ``VideoLayout`` (or dict / tuple) for every video site, overriding inference.
    min_video_tokens:
        Sites with fewer video tokens stay dense (sparsity does not pay there).
    cost_model:
        Keep a site dense SDPA at call shapes where the sparse path is expected to be slower (``ops/cost.py``:
        per-call overheads plus the plan's kept blocks, against dense attention at measured TFLOP/s; sparse
        only below 0.9x dense). Decided per shape on the host, for the Triton kernel (the CPU reference
        is never judged); ``rf_compile.stats()`` lists the reason under ``dense_shapes``, the compile report
        of a static shape under ``reason``. ``False``: sparse wherever a layout allows it.
    kernel:
        ``"auto"`` (Triton on CUDA, reference elsewhere), ``"triton"`` or ``"reference"``.
    precision:
        ``"bf16"`` (default): the sparse attention's products in the inputs' dtype. ``"fp8"``:
        Q K^T and P V in float8 e4m3 on Hopper's tensor cores from per-block scaled copies (the
        same plans). ``"int8"``: Q K^T in int8 (K smoothed, one scale per head) and P V in e4m3,
        with 2.5x less attention error than ``"fp8"``. A site that cannot run an 8-bit precision
        (not the Triton kernel on a Hopper GPU) stays dense and the report says so.
    report:
        Print the site table after each graph is compiled.
    strict:
        Raise instead of leaving a site dense when a pass fails unexpectedly.
    compile_mode:
        The inductor mode (``torch.compile``'s ``mode``) for the rest of the graph. ``torch.compile``
        refuses ``mode=`` together with ``options=``, so with options pass the mode here, e.g.
        ``options={"mode": "v2", "compile_mode": "max-autotune"}``; ``None`` keeps ``mode=`` or the default.
    compiler:
        What runs the graph after the passes: ``"inductor"`` (default), or ``"eager"``: the rewritten
        graph op by op, as Dynamo's ``eager`` backend runs it (the same sites, layouts and sparse calls,
        no inductor codegen). For bisecting a wrong output (right with ``"eager"``: the fault is
        downstream of the passes) and for fast CPU checks of the passes. Refuses inductor options.
    """

    mode: str = "v1"
    bandwidth: float = 0.25
    bandwidths: tuple[float, ...] = (0.5, 0.25, 0.125)
    recall_target: float = 0.9
    stride: int = 2
    alpha: float | None = None
    sample_stride: int | None = None
    arm_query_rows: int | None = 384
    dense_warmup: float = 0.1
    num_steps: int | None = None
    arm_every: int = 1
    sparsity: float = 0.8
    sparsity_ramp: float | None = None
    select: str = "topk"
    mass: float = 0.9
    budget: str = "query_block"
    budget_floor: float = 0.25
    order: str | None = None
    textural: str | None = None
    textural_density: float | None = None
    dense_layers: int = 0
    dense_last_steps: int = 0
    measure_error: bool = False
    profile: str | None = None
    candidates: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
    tile: tuple[int, int, int] | None = None
    sink_frames: int = 0
    layout: VideoLayout | None = None
    min_video_tokens: int = 256
    cost_model: bool = True
    kernel: str = "auto"
    precision: str = "bf16"
    report: bool = False
    strict: bool = False
    compile_mode: str | None = None
    compiler: str = "inductor"

    def _check_ramp(self) -> None:
        ramp = self.sparsity_ramp
        if ramp is None:
            return
        if isinstance(ramp, bool) or not isinstance(ramp, (int, float)) or ramp < 0:
            raise OptionError(f"option 'sparsity_ramp' must be a fraction >= 0 or None, got {ramp!r}")
        if ramp == 0:
            return
        sparsity = self.ramped_sparsity
        if sparsity is None:
            raise OptionError(
                "option 'sparsity_ramp' schedules a per-head budget of predicted blocks: use it with mode='v2', "
                "or mode='v1' / 'v1+' with textural='blocks', and budget='query_block' and no profile (got "
                f"mode={self.mode!r}, textural={self.textural_pattern!r}, budget={self.budget!r}, "
                f"profile={self.profile!r})"
            )
        if not (0 <= sparsity - ramp and sparsity + ramp < 1):
            raise OptionError(
                f"option 'sparsity_ramp' {ramp} takes sparsity {sparsity:g} to "
                f"[{sparsity - ramp:g}, {sparsity + ramp:g}]; accepted: both ends in [0, 1)"
            )

    @property
    def ramped_sparsity(self) -> float | None:
        """The block sparsity that ``sparsity_ramp`` moves over the steps: v2's ``sparsity``; with v1's
        ``textural="blocks"`` the predicted non-local heads' ``1 - textural_density``; None where no per-head
        budget of predicted blocks applies (a pooled budget, a profile, the checkerboard)."""
        if self.budget != "query_block" or self.profile is not None:
            return None
        if self.mode == "v2":
            return float(self.sparsity)
        if self.predicts_nonlocal:
            return 1.0 - self.nonlocal_density
        return None

    @property
    def textural_pattern(self) -> str:
        """What v1 / v1+ compute for non-local heads: the option's, or for ``None`` v1's ``"blocks"`` and
        v1+'s ``"checkerboard"``."""
        if self.textural is not None:
            return self.textural
        return "blocks" if self.mode == "v1" else "checkerboard"

    @property
    def predicts_nonlocal(self) -> bool:
        """Whether v1 / v1+ give the heads the ARM finds neither spatial nor temporal predicted blocks."""
        return self.mode in ("v1", "v1+") and self.textural_pattern == "blocks"

    @property
    def block_order(self) -> str:
        """The token order of predicted blocks: the option's, or for ``None`` ``"tokens"`` for v1 / v1+ and
        ``"tiles"`` otherwise."""
        if self.order is not None:
            return self.order
        return "tokens" if self.mode in ("v1", "v1+") else "tiles"

    @property
    def nonlocal_density(self) -> float:
        """Share of key blocks of v1's block-predicted non-local heads (``textural="blocks"``)."""
        return TEXTURAL_DENSITY if self.textural_density is None else float(self.textural_density)

    @property
    def ramp(self) -> float:
        """The sparsity ramp in effect: the option's, or for ``None`` the default narrowed to fit (0 where
        no per-step budget of predicted blocks applies)."""
        if self.sparsity_ramp is not None:
            return float(self.sparsity_ramp)
        sparsity = self.ramped_sparsity
        if sparsity is None:
            return 0.0
        return max(0.0, min(DEFAULT_RAMP, sparsity, MAX_RAMPED_SPARSITY - sparsity))

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.compile_mode is not None:
            _check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _check_choice("compiler", self.compiler, COMPILERS)
        if self.compiler == "eager" and self.compile_mode not in (None, "default"):
            mode = self.compile_mode
            raise OptionError(f"option 'compile_mode'={mode!r} is an inductor mode: use it with compiler='inductor'")
        _check_choice("select", self.select, SELECTIONS)
        if self.order is not None:
            _check_choice("order", self.order, ORDERS)
        if self.textural is not None:
            _check_choice("textural", self.textural, NONLOCAL)
        _check_choice("budget", self.budget, BUDGETS)
        _check_fraction("budget_floor", self.budget_floor)
        if self.budget != "query_block" and self.select != "topk":
            raise OptionError(f"option 'budget'={self.budget!r} pools top-k budgets: use it with select='topk'")
        if self.budget != "query_block" and self.profile is not None:
            raise OptionError("option 'profile' sets each head's own budget: use it with budget='query_block'")
        _check_int("dense_layers", self.dense_layers, minimum=0)
        if not self.candidates:
            raise OptionError("option 'candidates' must hold at least one block density in (0, 1]")
        for density in self.candidates:
            _check_fraction("candidates", density)
        if self.profile is not None and not isinstance(self.profile, str):
            raise OptionError(f"option 'profile' must be the path of a profile JSON (a str), got {self.profile!r}")
        if self.profile is not None and self.mode != "v2":
            raise OptionError(f"option 'profile' applies v2 block densities: use it with mode='v2', got {self.mode!r}")
        _check_int("dense_last_steps", self.dense_last_steps, minimum=0)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise OptionError(f"option 'sparsity' must be a fraction in [0, 1), got {self.sparsity!r}")
        _check_fraction("mass", self.mass)
        if self.tile is not None:
            if len(self.tile) != 3 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.tile):
                raise OptionError(f"option 'tile' must be 3 positive ints (frames, height, width), got {self.tile!r}")
        _check_int("sink_frames", self.sink_frames, minimum=0)
        _check_fraction("bandwidth", self.bandwidth)
        if not self.bandwidths:
            raise OptionError("option 'bandwidths' must hold at least one fraction in (0, 1]")
        for b in self.bandwidths:
            _check_fraction("bandwidths", b)
        _check_fraction("recall_target", self.recall_target)
        if self.alpha is not None:
            _check_fraction("alpha", self.alpha)
        _check_int("stride", self.stride, minimum=2)
        if self.textural_density is not None:
            _check_fraction("textural_density", self.textural_density)
            if not self.predicts_nonlocal:
                raise OptionError(
                    "option 'textural_density' sets the share of v1's block-predicted non-local heads: use it with "
                    f"mode='v1' (textural='blocks' by default) or mode='v1+' and textural='blocks' (got "
                    f"mode={self.mode!r}, textural={self.textural_pattern!r})"
                )
        self._check_ramp()
        if self.sample_stride is not None:
            _check_int("sample_stride", self.sample_stride, minimum=1)
        if self.arm_query_rows is not None:
            _check_int("arm_query_rows", self.arm_query_rows, minimum=1)
        if self.num_steps is not None:
            _check_int("num_steps", self.num_steps, minimum=1)
        _check_int("arm_every", self.arm_every, minimum=1)
        _check_int("min_video_tokens", self.min_video_tokens, minimum=0)
        if not isinstance(self.dense_warmup, (int, float)) or not 0.0 <= self.dense_warmup < 1.0:
            raise OptionError(f"option 'dense_warmup' must be a fraction in [0, 1), got {self.dense_warmup!r}")
        if self.num_steps is not None and self.warmup_steps + self.dense_last_steps > self.num_steps:
            raise OptionError(
                f"options 'dense_warmup' ({self.warmup_steps} steps) and 'dense_last_steps' ({self.dense_last_steps}) "
                f"add up to more than 'num_steps' ({self.num_steps}); accepted: their sum <= num_steps"
            )
        for name in ("report", "strict", "measure_error", "cost_model"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"option {name!r} must be True or False, got {getattr(self, name)!r}")

    @property
    def warmup_steps(self) -> int:
        """Dense steps at the start of each video: ``ceil(dense_warmup * num_steps)`` (``None``: 50;
        a pipeline's own count is applied at run time, on the device)."""
        return math.ceil(self.dense_warmup * (self.num_steps or DEFAULT_NUM_STEPS))

    @property
    def head_bandwidths(self) -> tuple[float, ...]:
        """Candidate bandwidths of spatial/temporal heads, smallest first."""
        return tuple(sorted(set(self.bandwidths))) if self.mode == "v1+" else (self.bandwidth,)

    @property
    def threshold(self) -> float:
        """Recall a spatial/temporal mask must reach for the ARM to choose it: v1+'s ``recall_target``, v1's
        ``alpha`` (for ``None``, 0.99 with predicted non-local heads, 0.8 with the checkerboard)."""
        if self.mode == "v1+":
            return self.recall_target
        if self.alpha is not None:
            return float(self.alpha)
        return ALPHA_BLOCKS if self.predicts_nonlocal else ALPHA_CHECKERBOARD

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> tuple[RainFusionConfig, dict[str, Any]]:
        """Split ``options`` into our config and the remaining (inductor) options."""
        options = dict(options or {})
        ours = {f.name for f in dataclasses.fields(cls)}
        values = {key: options.pop(key) for key in list(options) if key in ours}
        if "layout" in values and values["layout"] is not None:
            try:
                values["layout"] = VideoLayout.from_value(values["layout"])
            except ValueError as error:
                raise OptionError(f"option 'layout': {error}") from None
        if values.get("profile") is not None:
            values["profile"] = str(values["profile"])  # a pathlib.Path is welcome; the config stays hashable
        for key in ("bandwidths", "tile", "candidates"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        unknown = [key for key in options if not _is_inductor_option(key)]
        if unknown:
            raise OptionError(
                f"unknown rainfusion option(s) {unknown}; accepted keys: {sorted(ours)} "
                "plus any torch._inductor.config option"
            )
        config = cls(**values)
        if config.compiler == "eager" and options:
            raise OptionError(f"inductor option(s) {sorted(options)} need compiler='inductor' (got compiler='eager')")
        log.debug("rainfusion config: %s", config)
        return config, options


def _is_inductor_option(key: str) -> bool:
    from torch._inductor import config as inductor_config

    return key in inductor_config._config or key.replace("-", "_") in inductor_config._config


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise OptionError(f"option {name!r} must be one of {list(accepted)}, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise OptionError(f"option {name!r} must be a fraction in (0, 1], got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"option {name!r} must be an int >= {minimum}, got {value!r}")
