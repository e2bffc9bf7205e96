"""Layers of the package import only downward (issue 12; DESIGN.md, "Layers import only downward").

Every module under ``rf_compile/`` is parsed with ``ast``; every ``import`` / ``from ... import``
anywhere in it counts, including lazy imports inside functions and ``TYPE_CHECKING`` blocks. A
module may import its own layer and the layers of lower rank:

    rank 8  cli (rf_compile/cli/*), demo.py     entry points: a console script and ``make demo``
    rank 7  rf_compile (__init__.py)            the public facade; cli and demo use ``import rf_compile``
    rank 7  presets.py                          diffusers model factories for cli, demo and tests
    rank 6  backend.py
    rank 5  passes/
    rank 4  ops/
    rank 3  kernels/
    rank 2  plan.py
    rank 1  config.py, report.py                options and the report records (they import layout only)
    rank 0  layout.py, bounded.py               VideoLayout; the bounded memo tables (no imports)

Layers of equal rank but different names may not import each other (``presets`` must not import the
facade, ``config`` not ``report``). ``reference/`` is the independent ground truth: it may import
``layout`` and, from ``plan``, the ``Pattern`` enum only (never a ``PlanTable``, ``element_mask`` or
the band arithmetic, so it cannot share a wrong plan), and no library module may import it (tests
and benchmarks do).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rf_compile"

RANKS = {
    "cli": 8,
    "demo": 8,
    "api": 7,
    "presets": 7,
    "calibrate": 6,
    "backend": 6,
    "passes": 5,
    "ops": 4,
    "kernels": 3,
    "plan": 2,
    "config": 1,
    "report": 1,
    "persistent": 1,
    "layout": 0,
    "bounded": 0,
}
REFERENCE_MAY_IMPORT = {"layout", "reference"}
REFERENCE_FROM_PLAN = {"Pattern"}

# Modules that break the order today in ways an import-line edit cannot fix, each with the reason;
# their test is a strict xfail, so it fails as soon as the module is fixed (then drop it from here).
KNOWN_VIOLATIONS: dict[str, str] = {}


def layer_of(module: str) -> str:
    """Layer of a dotted module name inside the package (``rf_compile`` itself is the facade)."""
    parts = module.split(".")
    assert parts[0] == "rf_compile", module
    if len(parts) == 1 or parts[1] == "__init__":
        return "api"
    return parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import of ``rf_compile`` in ``source``.

    Relative imports are resolved against ``module``; ``from rf_compile.x import y`` where ``y`` is a
    submodule is reported as a (conservative) import of ``rf_compile.x`` with name ``y``.
    """
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "rf_compile"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "rf_compile":
                names = [alias.name for alias in node.names]
                if target == "rf_compile":  # ``from rf_compile import ops`` imports the subpackage
                    found += [(f"rf_compile.{n}" if n in RANKS or n == "reference" else target, [n], node.lineno)
                              for n in names]
                else:
                    found.append((target, names, node.lineno))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Imports in ``source`` (the text of ``module``) that go against the layer order."""
    own = layer_of(module)
    bad = []
    for target, names, line in imports_of(source, module, is_package):
        layer = layer_of(target)
        where = f"{module}:{line} imports {target}" + (f" ({', '.join(names)})" if names else "")
        if own == "reference":
            if layer == "plan" and names and set(names) <= REFERENCE_FROM_PLAN:
                continue
            if layer not in REFERENCE_MAY_IMPORT:
                bad.append(f"{where}: reference/ may import only layout and plan.Pattern")
        elif layer == "reference":
            bad.append(f"{where}: only tests and benchmarks may use the reference")
        elif layer not in RANKS:
            bad.append(f"{where}: unknown layer {layer!r} (add it to RANKS)")
        elif layer != own and RANKS[layer] >= RANKS[own]:
            bad.append(f"{where}: {own} (rank {RANKS[own]}) may not import {layer} (rank {RANKS[layer]})")
    return bad


MODULES = sorted(PACKAGE.rglob("*.py"))


def _param(path: Path):
    rel = path.relative_to(PACKAGE.parent).as_posix()
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_VIOLATIONS[rel])] if rel in KNOWN_VIOLATIONS else []
    return pytest.param(path, id=rel, marks=marks)


@pytest.mark.parametrize("path", [_param(p) for p in MODULES])
def test_module_imports_only_downward(path):
    module = module_name(path)
    assert layer_of(module) in RANKS or layer_of(module) == "reference", f"{module}: no layer (add it to RANKS)"
    assert violations(path.read_text(), module, path.name == "__init__.py") == []


def test_every_known_violation_is_a_module():
    assert all((PACKAGE.parent / rel).is_file() for rel in KNOWN_VIOLATIONS)


# -- the checker itself --------------------------------------------------------------------------


def test_checker_flags_kernels_importing_ops():
    assert violations("from rf_compile.ops import x\n", "rf_compile.kernels.fake")
    assert violations("import rf_compile.ops.attention\n", "rf_compile.kernels.fake")
    assert violations("from ..ops.runtime import y\n", "rf_compile.kernels.fake")
    assert violations("from rf_compile import ops\n", "rf_compile.kernels.fake")
    assert violations("from rf_compile.plan import PlanTable\n", "rf_compile.kernels.fake") == []


def test_checker_counts_lazy_imports():
    source = "def f():\n    if True:\n        from rf_compile.backend import rainfusion\n"
    (message,) = violations(source, "rf_compile.ops.fake")
    assert "rf_compile.ops.fake:3 imports rf_compile.backend" in message


def test_checker_keeps_the_reference_independent():
    assert violations("from rf_compile.plan import Pattern\nfrom rf_compile.layout import VideoLayout\n",
                      "rf_compile.reference.fake") == []
    assert violations("from rf_compile.plan import Pattern, PlanTable\n", "rf_compile.reference.fake")
    assert violations("from rf_compile.plan import element_mask\n", "rf_compile.reference.fake")
    assert violations("import rf_compile.plan\n", "rf_compile.reference.fake")
    assert violations("from rf_compile.config import RainFusionConfig\n", "rf_compile.reference.fake")
    assert violations("from rf_compile.reference.attention import masked_attention\n", "rf_compile.ops.fake")


def test_checker_allows_downward_and_own_layer():
    assert violations("from rf_compile.ops import arm\nfrom rf_compile.kernels.arm import band_recall\n"
                      "from rf_compile.plan import Pattern\n", "rf_compile.ops.fake") == []
    assert violations("import rf_compile\nfrom rf_compile.presets import build_preset\n", "rf_compile.demo") == []
    assert violations("from rf_compile.layout import VideoLayout\n", "rf_compile.presets") == []
    assert violations("import rf_compile\n", "rf_compile.presets")  # equal rank, other layer
    assert violations("from . import masks\n", "rf_compile.reference", is_package=True) == []
