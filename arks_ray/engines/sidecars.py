"""The restart policy of supervised sidecar processes, as a pure state machine.

Called by ``deployments.dynamo_sidecars``, which runs the processes and asks a ``SidecarTracker`` what
to do each time one exits. Times are passed in (an injected clock), so the policy is tested without
sleeping.

A sidecar that exits is restarted after an exponential backoff. The backoff resets once a start has
lived ``stable_after_s``. More than ``max_restarts`` exits within ``window_s`` and the tracker gives up:
the sidecar is ``failed`` and stays so, which the Serve health check reports, and Serve then replaces the
whole replica.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

State = Literal["starting", "running", "backoff", "failed", "stopped"]


@dataclass(frozen=True)
class RestartPolicy:
    """When and how often an exited sidecar is started again."""

    initial_backoff_s: float = 0.5
    """Delay before the first restart after a crash."""

    max_backoff_s: float = 30.0
    """Upper bound of the delay."""

    factor: float = 2.0
    """Each crash that follows a short-lived start multiplies the delay by this."""

    max_restarts: int = 5
    """Restarts allowed within ``window_s``; one more exit and the sidecar has failed."""

    window_s: float = 300.0
    """Exits older than this are forgotten."""

    stable_after_s: float = 60.0
    """A start that lived this long resets the backoff to ``initial_backoff_s``."""

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s or self.factor < 1:
            raise ValueError(f"invalid backoff settings: {self}")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError(f"invalid restart limits: {self}")


@dataclass(frozen=True)
class Decision:
    """What to do after an exit: restart after ``delay_s``, or give up (``delay_s`` is None)."""

    delay_s: float | None
    reason: str


@dataclass
class SidecarTracker:
    """The restart bookkeeping of one sidecar."""

    name: str
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    state: State = "starting"
    starts: int = 0
    restarts: int = 0
    last_exit: int | None = None
    last_reason: str = ""
    _started_at: float | None = None
    _streak: int = 0
    _exits: deque[float] = field(default_factory=deque)

    def started(self, now: float) -> None:
        self.state = "running"
        self.starts += 1
        self._started_at = now

    def exited(self, now: float, code: int | None) -> Decision:
        """Record an exit (``code`` None: it could not even be started) and decide what follows."""
        if self.state in ("failed", "stopped"):
            return Decision(None, self.last_reason)
        self.last_exit = code
        lived = now - self._started_at if self._started_at is not None else 0.0
        self._started_at = None
        self._exits.append(now)
        while self._exits and now - self._exits[0] > self.policy.window_s:
            self._exits.popleft()
        what = "could not start" if code is None else f"exited with code {code}"
        if len(self._exits) > self.policy.max_restarts:
            self.state = "failed"
            self.last_reason = (f"{self.name} {what}; {len(self._exits)} exits within "
                                f"{self.policy.window_s:.0f}s, giving up")
            return Decision(None, self.last_reason)
        # A start that lived long enough begins a new streak of crashes: its delay is the initial one again.
        self._streak = 1 if lived >= self.policy.stable_after_s else self._streak + 1
        p = self.policy
        delay = min(p.max_backoff_s, p.initial_backoff_s * p.factor ** (self._streak - 1))
        self.state = "backoff"
        self.restarts += 1
        self.last_reason = f"{self.name} {what} after {lived:.1f}s; restart {self.restarts} in {delay:.1f}s"
        return Decision(delay, self.last_reason)

    def stopped(self) -> None:
        """Stopped on purpose (replica shutdown): no restart, not a failure."""
        if self.state != "failed":
            self.state = "stopped"

    def snapshot(self) -> dict[str, object]:
        return {"state": self.state, "starts": self.starts, "restarts": self.restarts,
                "last_exit": self.last_exit, "last_reason": self.last_reason}


@dataclass
class Liveness:
    """When a supervised server that no longer answers is killed (and so restarted by its ``SidecarTracker``).

    A start is given ``startup_s`` to answer for the first time: a server loading a model does not answer
    its health endpoint yet, and killing it for that would restart it forever. Once it has answered since
    its latest start, ``misses`` failed checks in a row kill it."""

    misses: int = 3
    startup_s: float = 1800.0
    _start: int = -1
    _since: float = 0.0
    _up: bool = False
    _missed: int = 0

    def check(self, start: int, now: float, healthy: bool) -> str | None:
        """One health check of start number ``start`` (``SidecarTracker.starts``); a reason to kill, or None."""
        if start != self._start:
            self._start, self._since, self._up, self._missed = start, now, False, 0
        if healthy:
            self._up, self._missed = True, 0
            return None
        if not self._up:
            if now - self._since > self.startup_s:
                self._start = -1
                return f"did not answer within {self.startup_s:.0f}s of its start"
            return None
        self._missed += 1
        if self._missed >= self.misses:
            missed, self._start = self._missed, -1
            return f"failed {missed} health checks in a row"
        return None
