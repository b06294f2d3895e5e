"""The reconcile queue (``controller.scheduling``): coalescing, one reconcile per namespace at a time,
retries with backoff, requeues, ticks, and a clean close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from controller.errors import PermanentError, TemporaryError
from controller.metrics import Metrics
from controller.reconcile import Outcome
from controller.scheduling import Scheduler
from controller.settings import TimingSettings

FAST = TimingSettings(debounce=0.01, drift_interval=3600, retry_backoff=(0.02, 0.1), max_concurrent=2)

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")




class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.running: dict[str, int] = {}
        self.overlap = False
        self.delay = delay
        self.failures: list[BaseException] = []
        self.requeue: float | None = None

    async def __call__(self, namespace: str) -> Outcome:
        self.running[namespace] = self.running.get(namespace, 0) + 1
        self.overlap |= self.running[namespace] > 1
        self.calls.append(namespace)
        try:
            await asyncio.sleep(self.delay)
            if self.failures:
                raise self.failures.pop(0)
            return Outcome(namespace, requeue_after=self.requeue)
        finally:
            self.running[namespace] -= 1


@pytest.fixture
async def make() -> AsyncIterator[list[Scheduler]]:
    made: list[Scheduler] = []
    yield made
    for s in made:
        await s.close()


def scheduler(made: list[Scheduler], rec: Recorder, timing: TimingSettings = FAST) -> Scheduler:
    s = Scheduler(rec, timing, Metrics())
    s.start()
    made.append(s)
    return s


async def idle(s: Scheduler) -> None:
    for _ in range(500):
        await asyncio.sleep(0.005)
        if not s.busy():
            return
    raise AssertionError("still busy")


async def test_a_burst_of_events_is_one_reconcile(make: list[Scheduler]) -> None:
    rec = Recorder()
    s = scheduler(make, rec)
    for _ in range(20):
        s.schedule("a")
    s.schedule("b")
    await idle(s)
    assert sorted(rec.calls) == ["a", "b"]


async def test_events_during_a_reconcile_cause_exactly_one_more(make: list[Scheduler]) -> None:
    rec = Recorder(delay=0.05)
    s = scheduler(make, rec)
    s.schedule("a")
    await asyncio.sleep(0.03)  # the first reconcile is running
    for _ in range(5):
        s.schedule("a")
    await idle(s)
    assert rec.calls == ["a", "a"]
    assert not rec.overlap


async def test_failures_are_retried_with_backoff(make: list[Scheduler]) -> None:
    rec = Recorder()
    rec.failures = [RuntimeError("boom"), TemporaryError("later", delay=0.05)]
    s = scheduler(make, rec)
    s.schedule("a")
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(rec.calls) == 3:
            break
    await idle(s)
    assert rec.calls == ["a", "a", "a"]
    assert s.namespaces["a"].failures == 0
    assert s.namespaces["a"].reconciles == 1
    assert s.metrics is not None
    assert s.metrics.errors.labels("RuntimeError")._value.get() == 1


async def test_permanent_errors_wait_for_the_next_change(make: list[Scheduler]) -> None:
    rec = Recorder()
    rec.failures = [PermanentError("invalid manifest")]
    s = scheduler(make, rec)
    s.schedule("a")
    await asyncio.sleep(0.2)
    assert rec.calls == ["a"]
    s.schedule("a")
    await idle(s)
    assert rec.calls == ["a", "a"]


async def test_requeue_after(make: list[Scheduler]) -> None:
    rec = Recorder()
    rec.requeue = 0.05
    s = scheduler(make, rec)
    s.schedule("a")
    await asyncio.sleep(0.03)
    rec.requeue = None
    await asyncio.sleep(0.1)
    await idle(s)
    assert rec.calls == ["a", "a"]


async def test_the_drift_tick_reconciles_known_namespaces(make: list[Scheduler]) -> None:
    rec = Recorder()
    s = scheduler(make, rec, TimingSettings(debounce=0.01, drift_interval=0.05))
    s.schedule("a")
    await asyncio.sleep(0.13)
    assert rec.calls.count("a") >= 2


async def test_close_stops_everything(make: list[Scheduler]) -> None:
    rec = Recorder(delay=1.0)
    s = scheduler(make, rec)
    s.schedule("a")
    s.schedule("b", delay=5)
    await asyncio.sleep(0.05)
    await s.close()
    s.schedule("c")  # ignored after close
    assert not s.busy() or all(st.worker is None for st in s.namespaces.values())
