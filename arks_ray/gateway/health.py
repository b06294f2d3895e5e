"""Backend health in the ingress: one circuit breaker per backend, fed by requests and health checks.

Called by ``arks_ray.gateway.routing.Router``, which owns one ``Breaker`` per backend. Pure: every
method takes the current time, so tests drive it with a fake clock.

- **closed**: in rotation. ``failure_threshold`` consecutive failures (backend errors, not client
  mistakes) or one failed health check open it.
- **open**: out of rotation for a cooldown that doubles each time the breaker re-opens without having
  recovered in between, up to ``max_cooldown_s``.
- **half-open**: after the cooldown, or as soon as a health check passes, the backend takes at most
  ``half_open_probes`` requests at a time. One success closes the breaker; one failure re-opens it. A
  failed health check restarts the cooldown: a backend the checks keep finding down gets no request as a
  probe (a retry landing there would fail the request).

A breaker that only health checks opened (an app still deploying, a server not up yet) closes as soon
as a check passes: there is no request failure to doubt it by, and probing one request at a time
would starve a backend that just came up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class BreakerSettings:
    """How quickly a failing backend leaves rotation and how it comes back."""

    failure_threshold: int = 3
    """Consecutive request failures that open the breaker."""
    cooldown_s: float = 5.0
    """Time out of rotation after the breaker first opens."""
    max_cooldown_s: float = 60.0
    """Upper bound of the doubling cooldown."""
    half_open_probes: int = 1
    """Requests a half-open backend takes at the same time."""


class Breaker:
    """The circuit breaker of one backend."""

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self.state: State = "closed"
        self.failures = 0
        self.reason = ""
        self.opened_at = 0.0
        self.cooldown_s = settings.cooldown_s
        self.probes = 0
        self.by_requests = False
        """Whether request failures (not only health checks) opened the breaker."""

    def _tick(self, now: float) -> None:
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            self.state, self.probes = "half_open", 0

    def available(self, now: float) -> bool:
        """May this backend take one more request now?"""
        self._tick(now)
        if self.state == "open":
            return False
        return self.state == "closed" or self.probes < self.settings.half_open_probes

    def view(self, now: float) -> State:
        self._tick(now)
        return self.state

    def on_start(self, now: float) -> None:
        self._tick(now)
        if self.state == "half_open":
            self.probes += 1

    def on_release(self, now: float) -> None:
        """The request ended with no verdict on the backend (the client left)."""
        if self.state == "half_open" and self.probes > 0:
            self.probes -= 1

    def on_success(self, now: float) -> None:
        self.state, self.failures, self.probes, self.reason = "closed", 0, 0, ""
        self.cooldown_s, self.by_requests = self.settings.cooldown_s, False

    def on_failure(self, now: float, reason: str) -> None:
        self._tick(now)
        self.failures += 1
        self.reason = reason
        if self.state == "half_open":
            # The probe failed: back out, for longer.
            self._open(now, min(self.cooldown_s * 2, self.settings.max_cooldown_s))
            self.by_requests = True
        elif self.state == "closed" and self.failures >= self.settings.failure_threshold:
            self._open(now, self.settings.cooldown_s)
            self.by_requests = True

    def on_health_check(self, now: float, ok: bool, reason: str = "") -> None:
        """An active health check: a failure opens the breaker at once, a pass lets probes through."""
        self._tick(now)
        if not ok:
            if self.state == "open":
                self.opened_at = now  # still down: the cooldown counts from the latest failed check
            else:
                self._open(now, self.cooldown_s if self.state == "half_open" else self.settings.cooldown_s)
            self.reason = reason or "health check failed"
        elif not self.by_requests and self.state != "closed":
            self.on_success(now)
        elif self.state == "open":
            self.state, self.probes = "half_open", 0

    def _open(self, now: float, cooldown_s: float) -> None:
        self.state, self.opened_at, self.cooldown_s, self.probes = "open", now, cooldown_s, 0
