"""Bounded memo tables: the per-shape caches of the passes and the op keep the newest entries only.

A model met at many shapes (every resolution a user tries) must not grow them without end; insertion order
makes the oldest entry the first to go.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

V = TypeVar("V")


def remember(cache: dict, key: Hashable, value: V, limit: int) -> V:
    """``cache[key] = value``, dropping the oldest entry first when ``limit`` are held; returns ``value``."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value
