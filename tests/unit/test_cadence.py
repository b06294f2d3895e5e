"""The coalescing interval an engine replica gives a new stream (``arks_ray.engines.cadence``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from arks_ray.engines import cadence

MS = st.floats(min_value=0, max_value=10_000, allow_nan=False)


def test_the_defaults_give_the_measured_settings_at_the_measured_loads() -> None:
    # 100 ms at 32 streams and 200 ms at 128 streams on one replica: benchmarks/results/gpu_h200_b.json
    assert cadence.interval_ms(cadence.BASE_MS, cadence.MAX_MS, 32) == 100.0
    assert cadence.interval_ms(cadence.BASE_MS, cadence.MAX_MS, 128) == 200.0
    assert cadence.interval_ms(cadence.BASE_MS, cadence.MAX_MS, 96) == 150.0


@given(MS, MS, st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=1000))
def test_the_interval_stays_between_base_and_ceiling_and_never_shrinks_with_load(
        base: float, ceiling: float, streams: int, knee: int) -> None:
    got = cadence.interval_ms(base, ceiling, streams, knee)
    assert base <= got <= max(base, ceiling)
    assert cadence.interval_ms(base, ceiling, streams + 1, knee) >= got
    if streams <= knee or base == 0 or ceiling <= base:
        assert got == base
