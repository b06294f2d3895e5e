"""Latency and load signals per backend, and the SLO factor that scales a backend's weight.

Called by ``arks_ray.gateway.routing.Router``. The ingress measures what it relays: time to first
token (TTFT) and time per output token (TPOT) of streams, and requests in flight. Each signal is an
exponentially weighted moving average (EWMA); a sample older than ``stale_s`` is forgotten, so a
backend that got little traffic while penalised is judged afresh.

The SLO factor of a backend is in ``[min_factor, 1]``:

- against the backend's own SLO (from its ArksApplication's ``autoscaling.slo``) when it has one: a
  backend at twice its TTFT target gets factor 1/2;
- otherwise against the best peer of the same endpoint, with a ``tolerance``: a backend up to
  ``tolerance`` times slower than the best one keeps factor 1, beyond that it is scaled down in
  proportion, so identical backends are never skewed by noise;
- requests in flight above ``queue_target`` scale it down in proportion too.

The factor moves toward its target by at most ``max_change_per_s`` per second, so one slow answer
cannot swing traffic, and a recovered backend ramps back up instead of being flooded. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SloSettings:
    """How latency and load turn into a weight factor."""

    alpha: float = 0.2
    """Weight of a new sample in the EWMAs."""
    tolerance: float = 2.0
    """Relative slowness, against the best peer, that costs nothing."""
    min_factor: float = 0.05
    """Lowest factor: a slow but healthy backend keeps a trickle of traffic (and fresh samples)."""
    max_change_per_s: float = 0.5
    """Bound on how fast the factor moves."""
    queue_target: int = 64
    """Requests in flight from this gateway replica above which a backend counts as queueing."""
    stale_s: float = 60.0
    """Age after which a sample no longer counts."""


@dataclass
class Ewma:
    """An exponentially weighted moving average with the time of its last sample."""

    value: float | None = None
    at: float = 0.0

    def add(self, sample: float, now: float, alpha: float) -> None:
        self.value = sample if self.value is None else alpha * sample + (1 - alpha) * self.value
        self.at = now

    def fresh(self, now: float, stale_s: float) -> float | None:
        return self.value if self.value is not None and now - self.at <= stale_s else None


@dataclass(frozen=True)
class Slo:
    """A backend's own latency targets, in milliseconds."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass
class Signals:
    """What the ingress observed of one backend."""

    ttft_ms: Ewma = field(default_factory=Ewma)
    tpot_ms: Ewma = field(default_factory=Ewma)
    in_flight: int = 0
    factor: float = 1.0
    factor_at: float | None = None
    reason: str = ""


def _target(value: float | None, own: float | None, best: float | None, s: SloSettings) -> tuple[float, str]:
    """The factor one latency signal asks for, and why."""
    if value is None or value <= 0:
        return 1.0, ""
    if own:
        pressure = value / own
        return (1.0, "") if pressure <= 1 else (1 / pressure, f"{value:.0f}ms against an SLO of {own:.0f}ms")
    if best:
        pressure = value / best
        if pressure > s.tolerance:
            return s.tolerance / pressure, f"{value:.0f}ms, {pressure:.1f}x the best peer"
    return 1.0, ""


def target_factor(sig: Signals, slo: Slo, best: Mapping[str, float | None], now: float,
                  s: SloSettings) -> tuple[float, str]:
    """The factor this backend should have now, before rate limiting, with the binding reason."""
    ttft = sig.ttft_ms.fresh(now, s.stale_s)
    tpot = sig.tpot_ms.fresh(now, s.stale_s)
    candidates: list[tuple[float, str]] = [(1.0, "")]
    for label, value, own, ref in (("TTFT", ttft, slo.ttft_ms, best.get("ttft_ms")),
                                   ("TPOT", tpot, slo.tpot_ms, best.get("tpot_ms"))):
        factor, why = _target(value, own, ref, s)
        candidates.append((factor, f"{label} {why}"))
    if sig.in_flight > s.queue_target:
        candidates.append((s.queue_target / sig.in_flight, f"{sig.in_flight} requests in flight"))
    factor, reason = min(candidates, key=lambda c: c[0])
    return max(s.min_factor, factor), reason if factor < 1 else ""


def best_of(signals: list[Signals], now: float, s: SloSettings) -> dict[str, float | None]:
    """The lowest fresh TTFT and TPOT among an endpoint's backends (the peer reference)."""
    out: dict[str, float | None] = {}
    for name in ("ttft_ms", "tpot_ms"):
        values = [v for v in (getattr(sig, name).fresh(now, s.stale_s) for sig in signals) if v]
        out[name] = min(values) if values else None
    return out


def step(sig: Signals, target: float, reason: str, now: float, s: SloSettings) -> float:
    """Move ``sig.factor`` toward ``target`` by at most ``max_change_per_s`` since the last step."""
    if sig.factor_at is None:
        sig.factor_at = now
    dt = max(0.0, now - sig.factor_at)
    limit = s.max_change_per_s * dt
    sig.factor = min(1.0, max(s.min_factor, sig.factor + max(-limit, min(limit, target - sig.factor))))
    sig.factor_at = now
    sig.reason = reason if target < 1 else ""
    return sig.factor
