"""Tensors that outlive one call of the op (state, cached plans), made outside CUDA-graph memory pools.

While inductor's CUDA-graph trees warm up or record a graph, every allocation of the current thread
goes into their private pool, and they check afterwards that the pool holds nothing but the graph's
own tensors. State kept across calls must live elsewhere: ``persistent`` makes it on a helper thread,
whose allocations are not routed to the pool, and makes the current stream wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def persistent(make: Callable[[], T], device: torch.device | str) -> T:
    """``make()``, with its CUDA allocations outside any CUDA-graph pool (one-time work: a thread)."""
    device = torch.device(device)
    if device.type != "cuda":
        return make()
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "rainfusion: a site met a new shape or model for the first time inside CUDA-graph capture; "
            "run one call outside capture first (torch.compile's CUDA graphs do this for you)"
        )
    result: list = []
    errors: list[BaseException] = []
    made = torch.cuda.Event()

    def run() -> None:
        try:
            with torch.cuda.device(device):
                result.append(make())
                made.record()  # after the kernels that filled the new tensors, on this thread's stream
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)

    thread = threading.Thread(target=run, name="rainfusion-persistent")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    torch.cuda.current_stream(device).wait_event(made)
    return result[0]
