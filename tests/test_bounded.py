"""The bounded memo tables behind the per-shape caches (site specs, the cost model, the passes' dims)."""

from rf_compile.bounded import remember
from rf_compile.config import RainFusionConfig
from rf_compile.layout import VideoLayout
from rf_compile.ops.runtime.sites import SiteSpec


def test_the_oldest_entry_goes_first_and_a_key_met_again_is_replaced():
    cache: dict = {}
    for key in "abc":
        assert remember(cache, key, key.upper(), limit=2) == key.upper()
    assert cache == {"b": "B", "c": "C"}
    remember(cache, "c", "C2", limit=3)
    assert list(cache.items()) == [("b", "B"), ("c", "C2")]


def test_a_site_keeps_its_newest_dense_verdicts_only():
    spec = SiteSpec("s", "s", RainFusionConfig(), layout=VideoLayout(2, 3, 4))
    for n in range(SiteSpec.MAX_LAYOUTS + 1):
        spec.remember_dense((n,), f"reason {n}")
    assert spec.dense_verdict((0,)) is None  # the first one made room
    assert spec.dense_verdict((1,)) == "reason 1" and spec.dense_verdict((SiteSpec.MAX_LAYOUTS,)) is not None
