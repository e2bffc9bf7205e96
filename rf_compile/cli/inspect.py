"""``rf-inspect``: see what the rainfusion backend does to a model, site by site.

For people: builds a preset (or calls a user factory), captures it with Dynamo, runs the
backend's passes (find_attention -> assign_layouts -> rewrite_sites) on each captured graph and
prints the site table; optionally runs a few denoising-like steps and adds what the op measured
(``--run``), draws the chosen head patterns (``--plot``), exports the FX graph (``--export``) or
prints everything as JSON (``--json``).

Not for: benchmarking or checking numerics. The rewritten graphs run eagerly, without inductor
(inductor only compiles the rest of the graph, the attention op is opaque to it), so capture is
fast and, at ``--size full`` without ``--run``, runs on the ``meta`` device without any compute.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rf_compile.backend import apply_passes
from rf_compile.cli.inspection import Captured, Inspection, Target, timesteps
from rf_compile.cli.text_output import format_text, to_json
from rf_compile.config import RainFusionConfig
from rf_compile.passes.context import PassContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tiny presets have fewer video tokens than the backend's default threshold: show them sparse.
TINY_OPTIONS = {"min_video_tokens": 0}
NO_SITES = "no scaled_dot_product_attention call found in the model"

EXAMPLES = """\
examples:
  rf-inspect cogvideox                          site table of a tiny random CogVideoX
  rf-inspect hunyuanvideo --run 3 --plot hv.png run 3 steps, add ARM statistics, draw head patterns
  rf-inspect wan --size full                    the published Wan2.1-14B config, captured on meta
  rf-inspect cogvideox --option mode='"v1+"' --option bandwidth=0.125
  rf-inspect ltx --layout 3,4,6                 explicit layout (frames,height,width[,prefix,suffix])
  rf-inspect cogvideox --export graph.graphml   FX graph with attention and layout nodes marked
  rf-inspect mypkg.models:make_model --json     a factory returning (model, args, kwargs)
"""


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from rf_compile.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="rf-inspect",
        description="Show what the rainfusion torch.compile backend does to each attention site of a model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"a preset ({', '.join(PRESETS)}) or 'package.module:factory', a callable returning (model, args, kwargs)",
    )
    preset = parser.add_argument_group("presets")
    preset.add_argument(
        "--size",
        choices=("tiny", "full"),
        default="tiny",
        help="tiny: random weights, CPU-fast (default); full: the published config, built on the meta "
        "device (no memory, no compute) unless --run is given",
    )
    preset.add_argument("--device", default="cpu", help="device of the model and inputs (default: cpu)")
    preset.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="default: float32")
    preset.add_argument(
        "--layers", type=_positive_int, metavar="N", help="number of transformer layers instead of the size's"
    )
    preset.add_argument("--batch", type=_positive_int, default=1, help="batch size of the inputs (default: 1)")
    preset.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    backend = parser.add_argument_group("backend options")
    backend.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a rainfusion (or inductor) option; VALUE is read as JSON, else as a Python literal, else as "
        "a string (repeatable)",
    )
    backend.add_argument("--layout", metavar="F,H,W[,PREFIX,SUFFIX]", help="explicit video layout of every site")
    backend.add_argument(
        "--dynamo-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a torch._dynamo.config setting for the capture, e.g. capture_dynamic_output_shape_ops=True (repeatable)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--run",
        type=_positive_int,
        metavar="N",
        help="run N denoising-like steps (timestep 999 -> 0) and add the statistics of each site; "
        "num_steps defaults to N, so the dense warm-up covers its first ceil(dense_warmup * N) steps",
    )
    output.add_argument("--plot", metavar="OUT.png", help="heat map of the dominant pattern per head (needs --run)")
    output.add_argument("--export", metavar="GRAPH.graphml|GRAPH.dot", help="write the largest captured FX graph")
    output.add_argument("--json", action="store_true", help="print the report and statistics as JSON")
    calibration = parser.add_argument_group("calibration")
    calibration.add_argument(
        "--calibrate",
        metavar="PROFILE.json",
        help="instead of the report: calibrate per-head v2 block densities (rf_compile.calibrate) over --run N "
        "timesteps (default 8) and write the profile; apply it with --option mode=v2 --option profile=PROFILE.json",
    )
    calibration.add_argument(
        "--target", type=float, default=0.05, help="--calibrate: largest mean relative attention error (default 0.05)"
    )
    calibration.add_argument(
        "--density",
        type=float,
        help="--calibrate: instead of --target, the profile's mean block density (the heads' least squared error "
        "at that cost); rf_compile.retarget picks another target or density from a profile without a run",
    )
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def parse_options(pairs: Sequence[str], layout: str | None = None) -> dict[str, Any]:
    """Backend options from ``KEY=VALUE`` strings and ``--layout``; checked by ``RainFusionConfig``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"bad --option {pair!r}: expected KEY=VALUE, e.g. --option bandwidth=0.125")
        options[key.strip()] = _parse_value(text)
    if layout is not None:
        try:
            options["layout"] = tuple(int(part) for part in layout.split(","))
        except ValueError:
            raise CliError(f"bad --layout {layout!r}: expected F,H,W[,PREFIX,SUFFIX] integers") from None
    try:
        RainFusionConfig.from_options(options)
    except (ValueError, TypeError) as error:
        raise CliError(str(error)) from None
    return options


def parse_dynamo_config(pairs: Sequence[str]) -> dict[str, Any]:
    """``torch._dynamo.config`` settings from ``KEY=VALUE`` strings."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not hasattr(torch._dynamo.config, key.strip()):
            raise CliError(f"bad --dynamo-config {pair!r}: expected KEY=VALUE with KEY a torch._dynamo.config setting")
        settings[key.strip()] = _parse_value(text)
    return settings


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# -- what to inspect ------------------------------------------------------------------------------


def load_target(
    spec: str, size: str, device: str, dtype: torch.dtype, *, layers: int | None = None, batch: int = 1, seed: int = 0
) -> Target:
    """Build preset ``spec`` or call the factory ``package.module:callable``."""
    if ":" in spec:
        return _from_factory(spec)
    from rf_compile.presets import PRESETS, build_preset

    if spec not in PRESETS:
        raise CliError(f"unknown preset {spec!r}; presets: {', '.join(PRESETS)} (or package.module:factory)")
    preset = build_preset(spec, size, batch=batch, device=device, dtype=dtype, layers=layers, seed=seed)
    label = f"{spec} ({size}, {str(dtype).removeprefix('torch.')} on {device})"
    return Target(label, preset.model, tuple(preset.args), dict(preset.kwargs), preset)


def _from_factory(spec: str) -> Target:
    module_name, _, attribute = spec.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError, ValueError) as error:
        raise CliError(f"cannot import {spec!r}: {error}") from None
    if not callable(factory):
        raise CliError(f"cannot import {spec!r}: {type(factory).__name__} object is not callable")
    result = factory()
    if not (
        isinstance(result, (tuple, list))
        and len(result) == 3
        and isinstance(result[0], torch.nn.Module)
        and isinstance(result[1], (tuple, list))
        and isinstance(result[2], dict)
    ):
        shown = type(result).__name__
        if isinstance(result, (tuple, list)):
            shown += "(" + ", ".join(type(item).__name__ for item in result) + ")"
        raise CliError(f"factory {spec!r} must return (model: nn.Module, args: tuple, kwargs: dict), got {shown}")
    model, args, kwargs = result
    return Target(spec, model.eval(), tuple(args), dict(kwargs))


# -- capture, passes, steps ---------------------------------------------------------------------------


def capture(target: Target, options: dict[str, Any]) -> tuple[Callable, list[Captured]]:
    """Compile ``target.model`` with a backend that runs our passes and keeps each graph (no inductor).

    Runs one forward (on meta tensors for ``--size full``: no compute). Returns the compiled
    model, whose graphs run eagerly with ``rainfusion::attention`` in place, and the graphs.
    """
    config, _ = RainFusionConfig.from_options(options)
    graphs: list[Captured] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = PassContext(gm=gm, config=config, graph_index=len(graphs))
        apply_passes(gm, ctx)
        graphs.append(Captured(gm, ctx.sites))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(target.model, backend=backend)
    try:
        with torch.no_grad():
            compiled(*target.args, **target.kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        if isinstance(error.inner_exception, ValueError):
            raise CliError(str(error.inner_exception)) from None
        raise
    return compiled, graphs


def run_steps(compiled: Callable, target: Target, steps: int) -> None:
    """Run ``steps`` forwards with the ``timestep`` input descending (a progress bar on stderr)."""
    from tqdm import tqdm

    base = target.kwargs.get("timestep")
    with torch.no_grad():
        for value in tqdm(timesteps(steps), desc="denoising steps", unit="step", file=sys.stderr):
            kwargs = dict(target.kwargs)
            if isinstance(base, torch.Tensor):
                kwargs["timestep"] = torch.full_like(base, round(value) if not base.is_floating_point() else value)
            compiled(*target.args, **kwargs)


def inspect_target(target: Target, options: dict[str, Any], steps: int = 0) -> Inspection:
    """Capture ``target``, run the passes, and (``steps`` > 0) run it and collect the statistics."""
    import rf_compile

    if steps and "num_steps" not in options:  # --run N is an N-step video: warm up on its first steps
        options = {**options, "num_steps": steps}
    start = time.perf_counter()
    compiled, graphs = capture(target, options)
    result = Inspection(target, options, graphs, steps=steps, capture_seconds=time.perf_counter() - start)
    if not any(graph.sites for graph in graphs):
        raise CliError(NO_SITES)
    if steps:
        rf_compile.reset()
        run_steps(compiled, target, steps)
        measured = rf_compile.stats(target.model)  # this model instance's sites, by site name
        result.stats = {
            site.report.name: measured[site.report.name]
            for graph in graphs
            for site in graph.sites
            if site.report.name in measured
        }
    return result


# -- entry point ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``rf-inspect``: returns the exit status (2 for a user error, with one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except CliError as error:
        print(f"rf-inspect: error: {error}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.plot and not args.run:
        raise CliError("--plot needs --run N (the patterns are chosen while the model runs)")
    if args.export and not args.export.endswith((".graphml", ".dot")):
        raise CliError(f"--export {args.export!r}: the file name must end in .graphml or .dot")
    options = parse_options(args.option, args.layout)
    dynamo_config = parse_dynamo_config(args.dynamo_config)
    if args.size == "tiny" and ":" not in args.model:
        options = {**TINY_OPTIONS, **options}
    device = "meta" if args.size == "full" and not args.run else args.device
    target = load_target(
        args.model, args.size, device, DTYPES[args.dtype], layers=args.layers, batch=args.batch, seed=args.seed
    )
    if args.calibrate:
        return _calibrate(target, options, args)
    with torch._dynamo.config.patch(dynamo_config):
        try:
            result = inspect_target(target, options, steps=args.run or 0)
        except (RuntimeError, NotImplementedError, torch._dynamo.exc.TorchDynamoException) as error:
            if device != "meta":
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CliError(
                f"cannot capture {target.label} on the meta device: {reason}; capture it on a real device "
                f"instead: --size full --run 1 --device cuda (add --layers 1 to save memory)"
            ) from None
    print(to_json(result) if args.json else format_text(result))
    if args.plot:
        from rf_compile.cli.plot import plot_patterns

        plot_patterns(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.export:
        from rf_compile.cli.graph_export import export_graph

        export_graph(result, args.export)
        print(f"wrote {args.export}", file=sys.stderr)
    return 0


def _calibrate(target, options: dict, args: argparse.Namespace) -> int:
    """``--calibrate``: the timestep sweep of ``rf_compile.calibrate`` on the target's inputs; writes the profile."""
    from rf_compile.calibrate import calibrate

    if "timestep" not in target.kwargs:
        raise CliError(f"--calibrate needs a model called with a timestep= keyword; {target.label} has none")
    options = {key: value for key, value in options.items() if key not in ("mode", "num_steps")}
    try:
        calibrate(target.model, *target.args, steps=args.run or 8, target=args.target, density=args.density,
                  out=args.calibrate, options=options, **target.kwargs)  # fmt: skip
    except ValueError as error:
        raise CliError(str(error)) from None
    print(f"wrote {args.calibrate}; apply it with options={{'mode': 'v2', 'profile': {args.calibrate!r}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
