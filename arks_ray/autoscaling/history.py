"""The step-function history of the policy's signals, and the window statistics computed over it.

Called by ``arks_ray.autoscaling.decision``. Each ``Point`` holds from its time until the next point, so
only changes are stored, whatever the control loop's rate, and a window's mean is time-weighted. A
window statistic is ``None`` until the history covers the whole window: a decision never rests on less
evidence than its window asks for. Pure and immutable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Field = Literal["in_flight", "stable", "urgent", "keep"]
_EPS = 1e-9


@dataclass(frozen=True)
class Point:
    """The signals from ``t`` on, until the next point."""

    t: float
    in_flight: float
    """Requests in flight across the replicas, plus those queued at handles."""
    stable: int
    """Replicas the load asks for, averaged over the stable window."""
    urgent: int
    """Replicas the SLO, vLLM's queue or the KV cache ask for (0: no breach)."""
    keep: int
    """Replicas to keep because latency or KV use is close to its limit (0: no floor)."""

    def same_values(self, other: Point) -> bool:
        return (self.in_flight, self.stable, self.urgent, self.keep) == (
            other.in_flight, other.stable, other.urgent, other.keep)


@dataclass(frozen=True)
class History:
    """Points in time order; the first one is where the evidence starts."""

    points: tuple[Point, ...] = ()

    @property
    def start(self) -> float | None:
        return self.points[0].t if self.points else None

    def add(self, point: Point, horizon_s: float) -> History:
        """This history with ``point`` (if anything changed), forgetting what ended over ``horizon_s`` ago."""
        points = list(self.points)
        if points and points[-1].t > point.t:
            raise ValueError(f"time went backwards: {point.t} after {points[-1].t}")
        if not points or not points[-1].same_values(point):
            points.append(point)
        cutoff = point.t - horizon_s
        # Keep the last point at or before the cutoff: it is the value in force at the window's start.
        while len(points) > 1 and points[1].t <= cutoff:
            points.pop(0)
        return History(tuple(points))

    def segments(self, now: float, span_s: float, since: float | None = None) -> list[tuple[Point, float]] | None:
        """The points in force over ``[now - span_s, now]`` with how long each held there.

        ``None`` if the history (or ``since``, when later) starts after the window does. A zero span is
        the latest point alone, with weight 1."""
        start = self.start
        if start is None:
            return None
        window_start = now - span_s
        if max(start, since if since is not None else start) > window_start + _EPS:
            return None
        if span_s <= 0:
            return [(self.points[-1], 1.0)]
        out: list[tuple[Point, float]] = []
        for i, point in enumerate(self.points):
            end = self.points[i + 1].t if i + 1 < len(self.points) else now
            held = min(end, now) - max(point.t, window_start)
            if held > 0:
                out.append((point, held))
        return out or [(self.points[-1], 1.0)]

    def mean(self, field: Field, now: float, span_s: float) -> float | None:
        segs = self.segments(now, span_s)
        if segs is None:
            return None
        total = sum(w for _, w in segs)
        return sum(float(getattr(p, field)) * w for p, w in segs) / total

    def lowest(self, field: Field, now: float, span_s: float, since: float | None = None) -> float | None:
        """The value that held throughout the window (its minimum): what has been *sustained*."""
        segs = self.segments(now, span_s, since)
        return None if segs is None else min(float(getattr(p, field)) for p, _ in segs)

    def highest(self, field: Field, now: float, span_s: float) -> float | None:
        """The peak over the window: nothing above it was asked for the whole time."""
        segs = self.segments(now, span_s)
        return None if segs is None else max(float(getattr(p, field)) for p, _ in segs)

    def to_state(self) -> list[list[float]]:
        return [[p.t, p.in_flight, p.stable, p.urgent, p.keep] for p in self.points]

    @classmethod
    def from_state(cls, raw: Any) -> History:
        if not isinstance(raw, list):
            return cls()
        return cls(tuple(Point(float(t), float(f), int(s), int(u), int(k)) for t, f, s, u, k in raw))
