"""Compile-time site specs: what the rewrite pass knows of each site, kept by the key the op receives."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import torch

from rf_compile.bounded import remember
from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.plan import Variant, variants_for

# A site's layout for one call, from (size symbol -> value, calling model, sequence length): a
# VideoLayout, or why the call must stay dense.
LayoutResolver = Callable[[dict, "torch.nn.Module | None", int], "VideoLayout | str"]


@dataclasses.dataclass
class SiteSpec:
    """What the rewrite pass knows of one site: its name, config and layout (or how to find it)."""

    key: str
    name: str
    config: RainFusionConfig
    layout: VideoLayout | None = None  # static shapes: the layout
    resolver: LayoutResolver | None = None  # symbolic shapes / regional graphs: a layout per call sizes
    layout_source: str = "graph"
    variants: tuple[Variant, ...] = ()
    symbols: tuple = ()  # the size symbols whose values the op receives as ``sizes``
    owner_path: str = ""  # dotted path of the owner parameter from the graph's root module
    _layouts: dict[tuple, VideoLayout | str] = dataclasses.field(default_factory=dict, repr=False)
    _dense: dict[tuple, str] = dataclasses.field(default_factory=dict, repr=False)

    MAX_LAYOUTS = 32  # distinct call shapes remembered per site

    def layout_for(self, sizes: tuple[int, ...], model: torch.nn.Module | None, seq_len: int) -> VideoLayout | str:
        """The layout of a call with these symbolic sizes and length (cached, bounded)."""
        if self.resolver is None:
            assert self.layout is not None
            return self.layout
        key = (sizes, seq_len)
        found = self._layouts.get(key)
        if found is None:
            found = self.resolver(dict(zip(self.symbols, sizes)), model, seq_len)
            remember(self._layouts, key, found, self.MAX_LAYOUTS)
        return found

    def dense_verdict(self, shape_key: tuple) -> str | None:
        """Why calls of ``shape_key`` (``remember_dense``'s key) stay dense, if one of them was judged so before."""
        return self._dense.get(shape_key)

    def remember_dense(self, shape_key: tuple, reason: str) -> None:
        """Keep a call's dense verdict for the next calls of its key (bounded): a judged shape costs one lookup.

        The key must hold all that the verdict depends on besides the site: the call's sizes, its q, k and v
        shapes (as checked), dtype, device and mask shape.
        """
        remember(self._dense, shape_key, reason, self.MAX_LAYOUTS)


_SPECS: dict[str, SiteSpec] = {}
_LOCK = threading.Lock()


def register_site(
    name: str,
    layout: VideoLayout | None,
    config: RainFusionConfig,
    resolver: LayoutResolver | None = None,
    layout_source: str = "graph",
    symbols: tuple = (),
    owner_path: str = "",
) -> str:
    """Register a rewritten site; returns the key the op is called with.

    Give ``layout`` for a site whose shapes are static, else ``resolver``: it maps the sizes the
    op receives (values of ``symbols``) to a layout, or a reason to stay dense, on the first call
    of each shape.
    """
    if layout is None and resolver is None:
        raise ValueError(f"site {name!r} needs a layout or a resolver")
    with _LOCK:
        key, suffix = name, 1
        while key in _SPECS and not _same_spec(_SPECS[key], layout, config, resolver):
            suffix += 1
            key = f"{name}#{suffix}"
        if key not in _SPECS or resolver is not None:
            _SPECS[key] = SiteSpec(
                key, name, config, layout, resolver, layout_source, variants_for(config), symbols, owner_path
            )
        return key


def _same_spec(spec: SiteSpec, layout: VideoLayout | None, config: RainFusionConfig, resolver) -> bool:
    return resolver is None and spec.resolver is None and (spec.layout, spec.config) == (layout, config)


def get_spec(key: str) -> SiteSpec:
    try:
        return _SPECS[key]
    except KeyError:
        raise RuntimeError(
            f"rainfusion site {key!r} is not registered in this process; recompile the model "
            "with backend='rainfusion'"
        ) from None
