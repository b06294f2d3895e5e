"""The reconcile queue: one coalesced, retried reconcile per namespace, and the drift and status ticks.

kopf calls ``Scheduler.schedule(namespace)`` from every event handler (``controller.handlers``); the
scheduler runs ``reconcile(namespace)`` once for any burst of events, never twice at once for the same
namespace, and at most ``max_concurrent`` namespaces at a time. kopf's per-object queues cannot give
this: they serialise per object, while a render spans the namespace.

- **Coalescing.** The first event of a namespace starts a worker that waits ``debounce`` seconds, then
  reconciles; events arriving meanwhile (or during the reconcile) mark it dirty, and it runs once more.
- **Retries.** A failed reconcile is retried after ``TemporaryError.delay``, else with exponential
  backoff; a ``PermanentError`` waits for the next event or tick (the same input would fail again).
- **Ticks.** One ticker task (instead of kopf timers, which need a finalizer on every object and fire
  once per object) re-schedules every known namespace each ``drift_interval``, and namespaces with
  quotas each ``status_interval`` when usage is mirrored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from controller.errors import PermanentError, TemporaryError
from controller.metrics import Metrics
from controller.reconcile import Outcome
from controller.settings import TimingSettings

logger = logging.getLogger("controller.scheduling")

Reconcile = Callable[[str], Awaitable[Outcome]]


@dataclass
class NamespaceState:
    """What the scheduler knows about one namespace."""

    dirty: bool = False
    worker: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    timer_due: float = 0.0
    failures: int = 0
    reconciles: int = 0
    last: Outcome | None = None
    mirrored: bool = False
    """It has quotas or endpoints, whose status mirrors the counter store (usage, effective weights)."""


@dataclass
class Scheduler:
    """Coalescing per-namespace reconcile queue."""

    reconcile: Reconcile
    timing: TimingSettings = field(default_factory=TimingSettings)
    metrics: Metrics | None = None
    mirror_quotas: bool = False
    namespaces: dict[str, NamespaceState] = field(default_factory=dict)
    _ticker: asyncio.Task[None] | None = None
    _slots: asyncio.Semaphore | None = None
    _closed: bool = False

    def start(self) -> None:
        """Start the ticker; call from inside the operator's event loop."""
        self._slots = asyncio.Semaphore(self.timing.max_concurrent)
        self._ticker = asyncio.create_task(self._tick(), name="arks-ray ticker")

    def referenced_secret(self, namespace: str, name: str) -> bool:
        """Whether a token in ``namespace`` reads Secret ``name`` (filters the Secret watch)."""
        state = self.namespaces.get(namespace)
        return bool(state and state.last and name in state.last.secrets)

    def schedule(self, namespace: str, delay: float = 0.0) -> None:
        """Reconcile ``namespace`` soon (after ``delay`` seconds at the earliest); cheap and idempotent."""
        if self._closed:
            return
        state = self.namespaces.setdefault(namespace, NamespaceState())
        if delay > 0:
            self._schedule_later(namespace, state, delay)
            return
        state.dirty = True
        if state.worker is None:
            state.worker = asyncio.create_task(self._work(namespace, state), name=f"arks-ray reconcile {namespace}")
        self._gauge()

    def _schedule_later(self, namespace: str, state: NamespaceState, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if state.timer is not None and state.timer_due <= due:
            return  # an earlier wake-up is already set
        if state.timer is not None:
            state.timer.cancel()
        state.timer_due = due
        state.timer = loop.call_at(due, self._wake, namespace)

    def _wake(self, namespace: str) -> None:
        state = self.namespaces.get(namespace)
        if state is not None:
            state.timer = None
        self.schedule(namespace)

    async def _work(self, namespace: str, state: NamespaceState) -> None:
        try:
            while state.dirty and not self._closed:
                await asyncio.sleep(self.timing.debounce)
                state.dirty = False
                assert self._slots is not None, "Scheduler.start() was not called"
                async with self._slots:
                    await self._run(namespace, state)
        finally:
            state.worker = None
            self._gauge()
            if state.last is not None and state.last.empty and not state.dirty and state.timer is None:
                self.namespaces.pop(namespace, None)  # nothing of ours left there

    async def _run(self, namespace: str, state: NamespaceState) -> None:
        started = time.perf_counter()
        try:
            outcome = await self.reconcile(namespace)
        except Exception as exc:
            state.failures += 1
            lo, hi = self.timing.retry_backoff
            delay = min(lo * 2 ** (state.failures - 1), hi)
            if isinstance(exc, TemporaryError) and exc.delay is not None:
                delay = exc.delay
            self._count("error", type(exc).__name__, started)
            if isinstance(exc, PermanentError):
                logger.error("reconcile of %s failed, waiting for a change: %s", namespace, exc)
            else:
                logger.warning("reconcile of %s failed (%d in a row), retrying in %.1fs: %s",
                               namespace, state.failures, delay, exc, exc_info=not isinstance(exc, TemporaryError))
                self._schedule_later(namespace, state, delay)
            return
        state.failures = 0
        state.reconciles += 1
        plan = outcome.plan
        gateway = plan.rendered.gateway if plan and plan.rendered else None
        state.mirrored = bool(gateway and (gateway.quotas or gateway.endpoints))
        state.last = dataclasses.replace(outcome, plan=None)  # the render is big; keep the summary only
        self._count("ok", None, started)
        if outcome.requeue_after is not None:
            self._schedule_later(namespace, state, max(outcome.requeue_after, self.timing.debounce))

    def _count(self, outcome: str, error: str | None, started: float) -> None:
        if self.metrics is None:
            return
        self.metrics.reconciles.labels(outcome).inc()
        self.metrics.duration.observe(time.perf_counter() - started)
        if error:
            self.metrics.errors.labels(error).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.pending.set(sum(s.dirty for s in self.namespaces.values()))

    async def _tick(self) -> None:
        drift = self.timing.drift_interval
        status = self.timing.status_interval if self.mirror_quotas else drift
        step = min(drift, status)
        elapsed = 0.0
        while True:
            await asyncio.sleep(step)
            elapsed += step
            full = elapsed + 1e-9 >= drift
            if full:
                elapsed = 0.0
            for namespace, state in list(self.namespaces.items()):
                if full or state.mirrored:
                    self.schedule(namespace)

    def busy(self) -> bool:
        """Whether any reconcile is queued or running (timers for later do not count)."""
        return any(s.dirty or s.worker is not None for s in self.namespaces.values())

    async def close(self) -> None:
        """Stop the ticker, timers and workers, and wait for them (no task is left behind)."""
        self._closed = True
        tasks = [t for t in (self._ticker, *(s.worker for s in self.namespaces.values())) if t is not None]
        for state in self.namespaces.values():
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
