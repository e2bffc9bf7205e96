"""The calling model, from the Python call stack: its modules, their arguments, a parameter's owner.

Host-side only, and only on first calls (a new model, shape or site): never on the hot path.
"""

from __future__ import annotations

import sys

import torch


def calling_modules() -> list[torch.nn.Module]:
    """The nn.Modules whose ``__call__`` is on the Python stack now, outermost first."""
    call_codes = {torch.nn.Module._call_impl.__code__, torch.nn.Module._wrapped_call_impl.__code__}
    found: list[torch.nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in call_codes:
            module = frame.f_locals.get("self")
            if isinstance(module, torch.nn.Module) and all(module is not m for m in found):
                found.append(module)
        frame = frame.f_back
    return found[::-1]


def calling_frame_arguments(module: torch.nn.Module) -> tuple[tuple, dict] | None:
    """The (args, kwargs) ``module`` was called with, from its ``_call_impl`` frame on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is torch.nn.Module._call_impl.__code__ and frame.f_locals.get("self") is module:
            return tuple(frame.f_locals.get("args", ())), dict(frame.f_locals.get("kwargs", {}))
        frame = frame.f_back
    return None


def owning_module(owner: torch.Tensor) -> tuple[torch.nn.Module | None, str]:
    """The outermost module on the call stack holding the parameter ``owner``, and its name there."""
    for module in calling_modules():
        for name, parameter in module.named_parameters():
            if parameter is owner:
                return module, name
    return None, ""
