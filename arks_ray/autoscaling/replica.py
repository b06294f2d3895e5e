"""What one engine replica measures and reports for autoscaling (``record_autoscaling_stats``).

Called by ``deployments.vllm_engine.ArksLLMServer``: ``start()`` when a request arrives,
``first_output()`` when its first chunk is ready, ``finish()`` when it ends (however it ends),
``scheduler()`` from vLLM's stat logger after every engine step, and ``report()`` when Serve asks for
the replica's autoscaling stats. The policy (``arks_ray.autoscaling.decision``) reads the keys below.

- TTFT and TPOT are measured per streamed request, from the moment the replica receives it: the latency
  the gateway sees, minus the network. A non-streaming answer arrives whole, so it has no TTFT or TPOT
  of its own; it still counts in the queue depth and KV-cache signals.
- Percentiles are over the last ``window_s`` seconds (TTFT from the first chunk on, TPOT from the end of
  the answer), and are only reported with the number of samples behind them, so the policy can ignore a
  percentile of three.
- vLLM's scheduler counters only change when the engine steps. Once the replica has nothing in flight
  they are stale, so an idle replica reports an empty queue rather than the last busy step's.

Pure: every method takes the time (seconds on a monotonic clock).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

TTFT_MS = "arks_ttft_ms"
"""TTFT percentile (the policy's ``percentile``) over the window, in milliseconds; absent without samples."""
TPOT_MS = "arks_tpot_ms"
"""TPOT percentile over the window, in milliseconds; absent without samples."""
TTFT_SAMPLES = "arks_ttft_samples"
"""Requests behind the TTFT percentile."""
TPOT_SAMPLES = "arks_tpot_samples"
"""Requests behind the TPOT percentile (streams with at least two output tokens)."""
IN_FLIGHT = "arks_in_flight"
"""Requests inside the replica now (its own queue depth)."""
WAITING = "arks_waiting"
"""Requests waiting in vLLM's scheduler queue (not yet running); absent without engine stats."""
RUNNING = "arks_running"
"""Requests vLLM is running; absent without engine stats."""
KV_CACHE = "arks_kv_cache_usage"
"""Fraction of the KV cache in use (0 to 1); absent without engine stats."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class LatencyWindow:
    """Samples of one latency over the last ``window_s`` seconds, at most ``max_samples`` of them."""

    window_s: float
    max_samples: int = 4096
    _samples: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, value: float, now: float) -> None:
        self._samples.append((now, value))
        while len(self._samples) > self.max_samples:
            self._samples.popleft()

    def values(self, now: float) -> list[float]:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        return [v for _, v in self._samples]


@dataclass
class RequestTimer:
    """The timing of one request, from its arrival at the replica."""

    started: float
    first_at: float | None = None


@dataclass
class ReplicaStats:
    """A replica's latency windows, requests in flight and the last vLLM scheduler counters."""

    percentile: float = 95.0
    """Percentile reported for TTFT and TPOT (the SLO's)."""
    window_s: float = 10.0
    """Seconds of finished requests the percentiles cover."""
    engine_stale_s: float = 10.0
    """Age after which vLLM's counters no longer count, even with requests in flight."""
    in_flight: int = 0
    _ttft: LatencyWindow = field(init=False)
    _tpot: LatencyWindow = field(init=False)
    _engine: tuple[float, float, float, float] | None = None  # (at, running, waiting, kv use)
    _typical_tpot: tuple[float, float | None] = (float("-inf"), None)  # (computed at, median TPOT ms)
    _last_tpot: float | None = None  # the last median a window with requests gave

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {self.percentile}")
        self._ttft = LatencyWindow(self.window_s)
        self._tpot = LatencyWindow(self.window_s)

    def start(self, now: float) -> RequestTimer:
        self.in_flight += 1
        return RequestTimer(started=now)

    def first_output(self, timer: RequestTimer, now: float) -> None:
        """The first chunk of the answer is ready: TTFT counts now, not when the answer ends (only the
        first call per request counts)."""
        if timer.first_at is None:
            timer.first_at = now
            self._ttft.add((now - timer.started) * 1000, now)

    def finish(self, timer: RequestTimer, output_tokens: int, now: float) -> None:
        """The request ended after ``output_tokens`` tokens (normally, with an error, or cancelled)."""
        self.in_flight = max(0, self.in_flight - 1)
        if timer.first_at is not None and output_tokens > 1:
            self._tpot.add((now - timer.first_at) * 1000 / (output_tokens - 1), now)

    def typical_tpot_ms(self, now: float, every_s: float = 1.0, *, remembered: bool = False) -> float | None:
        """The median TPOT of the window's requests (None without any), recomputed at most every ``every_s``:
        new streams ask for it, and a window can hold thousands of requests.

        ``remembered``: a window without requests gives the last median one had (None only before the first).
        For the stride of a load that follows a pause: the model's pace is the best guess there is, and with
        None the whole first wave of a burst would be handed over token by token, when the replica is busiest.
        The window replaces it once the burst's first requests finish."""
        at, value = self._typical_tpot
        if now - at >= every_s:
            values = self._tpot.values(now)
            value = percentile(values, 50) if values else None
            self._typical_tpot = (now, value)
            if value is not None:
                self._last_tpot = value
        return self._last_tpot if value is None and remembered else value

    def scheduler(self, running: int, waiting: int, kv_cache_usage: float, now: float) -> None:
        """vLLM's scheduler counters after an engine step."""
        self._engine = (now, float(running), float(waiting), float(kv_cache_usage))

    def report(self, now: float) -> dict[str, float]:
        """The replica's autoscaling stats, as Serve's ``record_autoscaling_stats`` returns them."""
        out: dict[str, float] = {IN_FLIGHT: float(self.in_flight)}
        for key, count_key, window in ((TTFT_MS, TTFT_SAMPLES, self._ttft), (TPOT_MS, TPOT_SAMPLES, self._tpot)):
            values = window.values(now)
            out[count_key] = float(len(values))
            if values:
                out[key] = percentile(values, self.percentile)
        if self._engine is not None:
            at, running, waiting, kv = self._engine
            if self.in_flight == 0:
                # No request, no step: the last counters describe a busy moment that has passed.
                out.update({RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0})
            elif now - at <= self.engine_stale_s:
                out.update({RUNNING: running, WAITING: waiting, KV_CACHE: kv})
        return out
