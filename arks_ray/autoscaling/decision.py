"""The SLO-driven scaling decision: how many replicas an engine deployment should have, and why.

Called by the Serve policy adapter ``deployments.autoscaling`` on every control-loop tick, with one
``Observation`` (what the running replicas last reported, see ``arks_ray.autoscaling.replica``) and the
``Memory`` it returned last time. Pure: the observation carries the time.

Signals, from the replicas' reports:

- **urgent** (the panic window, ``panic_s``): a TTFT or TPOT percentile over its SLO, requests waiting
  in vLLM's queue, a KV cache over its target. Each asks for ``running x pressure`` replicas. A breach
  must hold for the whole panic window (a spike shorter than it changes nothing), and the latency of new
  capacity must have been measured (``latency_window_s`` after the running count last changed) before
  it can ask for more.
- **load** (the stable window, ``upscale_delay_s``): requests in flight, time-averaged over the window,
  against ``target_ongoing_requests`` per replica.
- **keep**: latency or KV use above ``headroom`` of its limit holds the current replicas.

Scale-up goes to the most any signal has sustained over its window; scale-down to the peak need over
the whole ``downscale_delay_s``. Each step is at most ``max_step_up`` / ``max_step_down`` replicas,
always within ``[low, high]``. Without fresh metrics from any running replica the decision holds, and
the windows start again once metrics are back. Every decision has a reason; ``Step.fresh`` says when it
differs from the previous one, or repeats it as a heartbeat, which is when the adapter logs it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from arks_ray.autoscaling import replica as keys
from arks_ray.autoscaling.history import History, Point

Action = Literal["up", "down", "hold"]
_EPS = 1e-9


@dataclass(frozen=True)
class PolicySettings:
    """The policy's knobs; ``deployments.autoscaling`` builds them from the rendered ``policy_kwargs``."""

    target_ongoing_requests: float = 8.0
    """Requests in flight per replica that the load signal aims for."""
    ttft_ms: float | None = None
    """TTFT target in milliseconds, at ``percentile``; none: TTFT does not drive scaling."""
    tpot_ms: float | None = None
    """TPOT target in milliseconds, at ``percentile``; none: TPOT does not drive scaling."""
    percentile: float = 95.0
    """Percentile the latency targets apply to; the replicas report this one."""
    upscale_delay_s: float = 30.0
    """Stable window: load is averaged over it, and must exceed its target over it, to scale up."""
    downscale_delay_s: float = 300.0
    """How long every signal must have needed fewer replicas before scaling down."""
    panic_window_s: float | None = None
    """How long an urgent signal must hold to scale up. Default: a tenth of ``upscale_delay_s``."""
    latency_window_s: float = 10.0
    """Seconds of requests behind the replicas' percentiles (they report over this window)."""
    max_step_up: int = 4
    """Most replicas added by one decision."""
    max_step_down: int = 1
    """Most replicas removed by one decision."""
    kv_cache_target: float = 0.9
    """KV-cache use above which a replica counts as full."""
    queue_target: float = 4.0
    """Requests waiting in vLLM's queue, per replica, above which the replicas count as saturated."""
    headroom: float = 0.8
    """Latency or KV use above this fraction of its limit blocks scale-down."""
    min_latency_samples: int = 5
    """Requests a replica's percentile needs behind it to count."""
    max_metric_age_s: float = 15.0
    """A replica's report older than this counts as missing."""
    log_size: int = 20
    """Decisions kept in the memory's log (the newest last)."""
    heartbeat_s: float = 30.0
    """An unchanged decision is logged again after this long, with the signals of the moment."""

    def __post_init__(self) -> None:
        for name in ("target_ongoing_requests", "ttft_ms", "tpot_ms", "kv_cache_target", "queue_target",
                     "max_metric_age_s", "latency_window_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("upscale_delay_s", "downscale_delay_s", "panic_window_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if not 0 < self.percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {self.percentile}")
        if self.max_step_up < 1 or self.max_step_down < 1:
            raise ValueError("max_step_up and max_step_down must be at least 1")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")

    @property
    def panic_s(self) -> float:
        return self.upscale_delay_s / 10 if self.panic_window_s is None else self.panic_window_s

    @property
    def horizon_s(self) -> float:
        """How much history the windows need."""
        return max(self.downscale_delay_s, self.upscale_delay_s, self.panic_s) + 1.0


@dataclass(frozen=True)
class ReplicaSignals:
    """The latest report of one running replica."""

    in_flight: float = 0.0
    ttft_ms: float | None = None
    ttft_samples: int = 0
    tpot_ms: float | None = None
    tpot_samples: int = 0
    waiting: float | None = None
    running: float | None = None
    kv_cache_usage: float | None = None

    @classmethod
    def from_report(cls, values: Mapping[str, float]) -> ReplicaSignals:
        return cls(
            in_flight=float(values.get(keys.IN_FLIGHT, 0.0)),
            ttft_ms=values.get(keys.TTFT_MS), ttft_samples=int(values.get(keys.TTFT_SAMPLES, 0)),
            tpot_ms=values.get(keys.TPOT_MS), tpot_samples=int(values.get(keys.TPOT_SAMPLES, 0)),
            waiting=values.get(keys.WAITING), running=values.get(keys.RUNNING),
            kv_cache_usage=values.get(keys.KV_CACHE),
        )


@dataclass(frozen=True)
class Observation:
    """One tick's view of a deployment."""

    now: float
    running: int
    """Replicas running."""
    target: int
    """Replicas Serve is currently asked for (the previous decision)."""
    low: int
    high: int
    replicas: tuple[ReplicaSignals, ...] = ()
    """Fresh reports of running replicas; empty when none is fresh."""
    queued: float = 0.0
    """Requests queued at handles, not yet on any replica."""
    report_age_s: float | None = None
    """Age of the newest report, fresh or not (for the reason when metrics are missing)."""


@dataclass(frozen=True)
class Pressure:
    """What one signal asks for."""

    replicas: int
    signal: str
    reason: str


@dataclass(frozen=True)
class Decision:
    replicas: int
    action: Action
    signal: str
    """What decided: ttft, tpot, queue, kv, load, bounds, missing, starting, steady, pending, error."""
    reason: str
    signals: str = ""
    """What the replicas reported this tick, in one line (``summary``)."""

    def record(self, now: float, current: int, repeat: bool = False) -> dict[str, Any]:
        return {"at": now, "action": self.action, "from": current, "to": self.replicas, "signal": self.signal,
                "reason": self.reason, "signals": self.signals, "repeat": repeat}


def summary(s: PolicySettings, obs: Observation) -> str:
    """The replicas' reports in one line: in flight per replica, worst percentiles, queue and KV use."""
    reps = obs.replicas
    parts = ["in flight " + "+".join(f"{r.in_flight:g}" for r in reps) + (f" (+{obs.queued:.1f} queued)"
                                                                          if obs.queued else "")]
    for label, value, count in (("TTFT", "ttft_ms", "ttft_samples"), ("TPOT", "tpot_ms", "tpot_samples")):
        seen = [(getattr(r, value), getattr(r, count)) for r in reps if getattr(r, value) is not None]
        if seen:
            parts.append(f"{label} p{s.percentile:g} {max(v for v, _ in seen):.0f} ms "
                         f"({sum(c for _, c in seen)} samples)")
    waiting = [r.waiting for r in reps if r.waiting is not None]
    if waiting:
        parts.append(f"vLLM waiting {sum(waiting):g}")
    kvs = [r.kv_cache_usage for r in reps if r.kv_cache_usage is not None]
    if kvs:
        parts.append(f"KV cache {max(kvs):.1%}")
    return f"{len(reps)} of {obs.running} replica(s) reporting: " + ", ".join(parts)


@dataclass(frozen=True)
class Memory:
    """What the policy keeps between ticks (in Serve's ``policy_state``)."""

    history: History = field(default_factory=History)
    running: int | None = None
    running_since: float | None = None
    last: tuple[str, str, int, int] | None = None
    logged_at: float | None = None
    log: tuple[dict[str, Any], ...] = ()

    def to_state(self) -> dict[str, Any]:
        return {"history": self.history.to_state(), "running": self.running, "running_since": self.running_since,
                "last": list(self.last) if self.last else None, "logged_at": self.logged_at, "log": list(self.log)}

    @classmethod
    def from_state(cls, raw: Any) -> Memory:
        if not isinstance(raw, dict):
            return cls()
        last = raw.get("last")
        key = (str(last[0]), str(last[1]), int(last[2]), int(last[3])) if last else None
        return cls(History.from_state(raw.get("history")), raw.get("running"), raw.get("running_since"), key,
                   raw.get("logged_at"), tuple(raw.get("log") or ()))


@dataclass(frozen=True)
class Step:
    decision: Decision
    memory: Memory
    fresh: bool
    """Log it: the decision differs from the previous one (action, signal, replicas or the replicas
    reporting), or the previous one was logged ``heartbeat_s`` ago."""


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def assess(s: PolicySettings, obs: Observation) -> tuple[float, Pressure | None, Pressure | None]:
    """Requests in flight, the strongest urgent signal and the strongest reason to keep replicas."""
    reps, n = obs.replicas, max(obs.running, 1)
    in_flight = sum(r.in_flight for r in reps) + obs.queued
    urgent: list[Pressure] = []
    keep: list[Pressure] = []
    for label, slo, seen in (
            ("ttft", s.ttft_ms, [r.ttft_ms for r in reps if r.ttft_ms is not None
                                 and r.ttft_samples >= s.min_latency_samples]),
            ("tpot", s.tpot_ms, [r.tpot_ms for r in reps if r.tpot_ms is not None
                                 and r.tpot_samples >= s.min_latency_samples])):
        if slo is None or not seen:
            continue
        worst, name = max(seen), f"{label.upper()} p{s.percentile:g}"
        pressure = worst / slo
        if pressure > 1:
            urgent.append(Pressure(_ceil(n * pressure), label,
                                   f"{name} {worst:.0f} ms is over its SLO of {slo:g} ms ({pressure:.2f}x)"))
        elif pressure > s.headroom:
            keep.append(Pressure(n, label, f"{name} {worst:.0f} ms is {pressure:.0%} of its SLO of {slo:g} ms"))
    waiting = sum(r.waiting for r in reps if r.waiting is not None)
    running = sum(r.running for r in reps if r.running is not None)
    if waiting > s.queue_target * n:
        urgent.append(Pressure(_ceil(n * (running + waiting) / max(running, 1.0)), "queue",
                               f"{waiting:g} requests waiting in vLLM's queue behind {running:g} running"))
    kvs = [r.kv_cache_usage for r in reps if r.kv_cache_usage is not None]
    if kvs:
        worst = max(kvs)
        if worst > s.kv_cache_target:
            urgent.append(Pressure(_ceil(n * worst / s.kv_cache_target), "kv",
                                   f"KV cache {worst:.0%} full, over its target of {s.kv_cache_target:.0%}"))
        elif worst > s.kv_cache_target * s.headroom:
            keep.append(Pressure(n, "kv", f"KV cache {worst:.0%} full, close to its target"))
    strongest = max(urgent, key=lambda p: p.replicas, default=None)
    return in_flight, strongest, max(keep, key=lambda p: p.replicas, default=None)


def _hold(replicas: int, signal: str, reason: str) -> Decision:
    return Decision(replicas, "hold", signal, reason)


def _guard(obs: Observation, memory: Memory) -> tuple[Decision, History] | None:
    """Bounds first, then what to do without evidence: hold, and forget the windows."""
    target, low, high = obs.target, obs.low, obs.high
    if target < low:
        return Decision(low, "up", "bounds", f"{target} replicas is below the minimum of {low}"), memory.history
    if target > high:
        return Decision(high, "down", "bounds", f"{target} replicas is above the maximum of {high}"), memory.history
    if obs.running == 0:
        return _hold(target, "starting", f"no replica running yet ({target} wanted)"), History()
    if not obs.replicas:
        age = f"for {obs.report_age_s:.0f}s" if obs.report_age_s is not None else "yet"
        return _hold(target, "missing", f"no engine metrics from the {obs.running} running replica(s) {age}: "
                                        f"holding at {target}"), History()
    return None


@dataclass(frozen=True)
class _Tick:
    """This tick's signals, with the history that now includes them."""

    history: History
    running_since: float
    stable: int
    mean: float | None
    urgent: Pressure | None
    keep: Pressure | None
    load: str


def _tick(s: PolicySettings, obs: Observation, memory: Memory) -> _Tick:
    now = obs.now
    in_flight, urgent, keep = assess(s, obs)
    per = s.target_ongoing_requests
    # The stable load is the window's mean including this tick: probe the history with the new in-flight.
    mean = memory.history.add(Point(now, in_flight, 0, 0, 0), s.horizon_s).mean("in_flight", now, s.upscale_delay_s)
    stable = _ceil((in_flight if mean is None else mean) / per)
    history = memory.history.add(
        Point(now, in_flight, stable, urgent.replicas if urgent else 0, keep.replicas if keep else 0), s.horizon_s)
    load = f"{in_flight:g} requests in flight" + (f" ({mean:.1f} on average over {s.upscale_delay_s:g}s)"
                                                  if mean is not None else "") + f", {per:g} per replica wanted"
    since = memory.running_since if memory.running_since is not None else now
    return _Tick(history, since, stable, mean, urgent, keep, load)


def _up(s: PolicySettings, obs: Observation, t: _Tick) -> Decision | None:
    """A scale-up, or a hold that explains why a signal asking for more does not get it yet."""
    target = obs.target
    wants: list[tuple[int, str, str]] = []
    if t.mean is not None and t.stable > target:
        wants.append((t.stable, "load", t.load))
    pending = ""
    if t.urgent is not None and t.urgent.replicas > target:
        # Latency measured before the running count last changed says nothing about the capacity now.
        sustained = t.history.lowest("urgent", obs.now, s.panic_s, since=t.running_since + s.latency_window_s)
        if sustained is not None and sustained > target:
            wants.append((int(sustained), t.urgent.signal, f"{t.urgent.reason}, for {s.panic_s:g}s (panic window)"))
        else:
            pending = (f"{t.urgent.reason}; not yet sustained over the {s.panic_s:g}s panic window at "
                       f"{obs.running} replica(s)")
    if obs.running < target and (wants or pending):
        reason = max(wants, key=lambda w: w[0])[2] if wants else pending
        return _hold(target, "starting", f"{reason}; waiting for the {target - obs.running} starting "
                                         f"replica(s) first")
    if wants:
        want, signal, reason = max(wants, key=lambda w: w[0])
        new = min(want, target + s.max_step_up, obs.high)
        if new == target:
            return _hold(target, signal, f"{reason}: {want} replicas needed, already at the maximum of {obs.high}")
        limits = "".join([f"; step limited to +{s.max_step_up}" if want > target + s.max_step_up else "",
                          f"; capped at the maximum of {obs.high}" if want > obs.high else ""])
        return Decision(new, "up", signal, f"{reason}: {want} replicas needed{limits}")
    return _hold(target, "pending", pending) if pending else None


def _down(s: PolicySettings, obs: Observation, t: _Tick) -> Decision:
    """A scale-down once the whole window asked for fewer replicas, else a hold that says why not."""
    now, target, low = obs.now, obs.target, obs.low
    need = max(t.stable, t.urgent.replicas if t.urgent else 0, t.keep.replicas if t.keep else 0, low)
    if need >= target:
        return _hold(target, "steady", f"{target} replica(s) fit: {t.keep.reason if t.keep else t.load}")
    waiting = f"{need} replica(s) needed now ({t.load}); scaling down after {s.downscale_delay_s:g}s of low demand"
    if obs.running != target or now - t.running_since < s.latency_window_s:
        return _hold(target, "pending", f"{waiting}, once the last change has settled")
    peaks = [t.history.highest(f, now, s.downscale_delay_s) for f in ("stable", "urgent", "keep")]
    if any(p is None for p in peaks):
        return _hold(target, "pending", waiting)
    peak = int(max(p for p in peaks if p is not None))
    new = max(peak, target - s.max_step_down, low)
    if new >= target:
        return _hold(target, "pending", f"{waiting}; {peak} needed at the peak of that window")
    return Decision(new, "down", "load", f"for {s.downscale_delay_s:g}s at most {peak} replica(s) needed ({t.load})")


def _decide(s: PolicySettings, obs: Observation, memory: Memory) -> tuple[Decision, History]:
    guarded = _guard(obs, memory)
    if guarded is not None:
        return guarded
    t = _tick(s, obs, memory)
    return (_up(s, obs, t) or _down(s, obs, t)), t.history


def decide(s: PolicySettings, obs: Observation, memory: Memory) -> Step:
    """The decision for this tick, the memory for the next one, and whether the decision is new."""
    if memory.running != obs.running:
        memory = replace(memory, running=obs.running, running_since=obs.now)
    decision, history = _decide(s, obs, memory)
    decision = replace(decision, signals=summary(s, obs) if obs.replicas else "")
    # A replica starting or stopping to report is news too: the decision now rests on other evidence.
    key = (decision.action, decision.signal, decision.replicas, len(obs.replicas))
    new = key != memory.last
    fresh = new or memory.logged_at is None or obs.now - memory.logged_at >= s.heartbeat_s
    if not fresh:
        return Step(decision, replace(memory, history=history), False)
    log = (*memory.log, decision.record(obs.now, obs.target, repeat=not new))[-s.log_size:]
    return Step(decision, replace(memory, history=history, last=key, logged_at=obs.now, log=log), True)
