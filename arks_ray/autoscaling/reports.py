"""From the replicas' reported time series to one ``Observation`` for the decision.

Called by ``deployments.autoscaling`` with Serve's raw custom metrics turned into plain data:
``{metric: {replica id: [(timestamp, value), ...]}}``. A replica records all its keys at once, so its
report is the set of keys whose last point carries its newest timestamp; a key missing from that point
(a percentile without samples) is absent now, however recent its older points are. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from arks_ray.autoscaling import replica as keys
from arks_ray.autoscaling.decision import Observation, ReplicaSignals

Series = Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]
_SAME_POINT_S = 1e-6


@dataclass(frozen=True)
class Report:
    at: float
    values: dict[str, float]


def latest(series: Series, prefix: str = "arks_") -> dict[str, Report]:
    """Each replica's newest report (only our keys, those starting with ``prefix``)."""
    newest: dict[str, float] = {}
    for name, by_replica in series.items():
        if name.startswith(prefix):
            for rid, points in by_replica.items():
                if points:
                    newest[rid] = max(newest.get(rid, points[-1][0]), points[-1][0])
    out = {rid: Report(at, {}) for rid, at in newest.items()}
    for name, by_replica in series.items():
        if name.startswith(prefix):
            for rid, points in by_replica.items():
                if points and abs(points[-1][0] - newest[rid]) <= _SAME_POINT_S:
                    out[rid].values[name] = float(points[-1][1])
    return out


def observe(series: Series, running: Sequence[str], *, now: float, target: int, low: int, high: int,
            queued: float, max_age_s: float) -> Observation:
    """The observation of this tick: the fresh reports of the running replicas, and the newest age."""
    reports = latest(series)
    mine = [reports[r] for r in running if r in reports and keys.IN_FLIGHT in reports[r].values]
    fresh = tuple(ReplicaSignals.from_report(r.values) for r in mine if now - r.at <= max_age_s)
    age = now - max(r.at for r in mine) if mine else None
    return Observation(now=now, running=len(running), target=target, low=low, high=high, replicas=fresh,
                       queued=queued, report_age_s=age)
