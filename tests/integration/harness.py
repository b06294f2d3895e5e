"""The integration harness: the operator in its own thread, a user over HTTP, and polling helpers.

Used by the fixtures in ``tests/integration/conftest.py`` and by the tests themselves.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kubernetes.client

from controller.kube import RESOURCES
from controller.metrics import Metrics
from controller.runtime import Runtime, build_runtime, run
from controller.settings import ControllerSettings, TimingSettings
from tests.support.keys import TEST_OPTIONS

WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}


def url_of(emulator: Any) -> str:
    return str(emulator.url).rstrip("/")


def writes(emulator: Any, since: int = 0) -> list[Any]:
    """Requests that changed something, from the emulator's request log."""
    return [r for r in list(emulator)[since:] if str(r.method.value) in WRITE_METHODS]


@dataclass
class Kubectl:
    """A user at a terminal, over HTTP."""

    base: str
    session: aiohttp.ClientSession

    def _path(self, kind: str, name: str | None = None, sub: str | None = None, ns: str = "default") -> str:
        return self.base + RESOURCES[kind].path(ns, name, sub)

    async def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        meta = doc.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        if await self.get(doc["kind"], meta["name"], ns=meta["namespace"]) is not None:
            return await self.patch(doc["kind"], meta["name"], {k: v for k, v in doc.items() if k != "metadata"},
                                    ns=meta["namespace"])
        meta.setdefault("uid", str(uuid.uuid4()))  # the emulator assigns none; owner references need it
        meta.setdefault("generation", 1)
        async with self.session.post(self._path(doc["kind"], ns=meta["namespace"]), json=doc) as r:
            assert r.status < 300, await r.text()
            return dict(await r.json())

    async def get(self, kind: str, name: str, ns: str = "default") -> dict[str, Any] | None:
        async with self.session.get(self._path(kind, name, ns=ns)) as r:
            return None if r.status == 404 else dict(await r.json())

    async def patch(self, kind: str, name: str, body: dict[str, Any], sub: str | None = None,
                    ns: str = "default") -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(self._path(kind, name, sub, ns), json=body, headers=headers) as r:
            assert r.status < 300, await r.text()
            return dict(await r.json())

    async def delete(self, kind: str, name: str, ns: str = "default") -> None:
        async with self.session.delete(self._path(kind, name, ns=ns)) as r:
            assert r.status < 300, await r.text()


@dataclass
class OperatorHandle:
    """One operator, running in its own thread and event loop, as ``kopf.testing.KopfRunner`` does.

    kopf cancels every task created after it started when it stops; in the test's own loop that would
    include the fixture teardown that stops it. The emulator stays in the test's loop, reached over TCP.
    """

    runtime: Runtime
    started_at: int = 0
    """Index in the emulator's request log when this operator started."""
    stop_flag: threading.Event = field(default_factory=threading.Event)
    ready_flag: threading.Event = field(default_factory=threading.Event)
    leftovers: list[str] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def _main(self) -> None:
        async def main() -> None:
            try:
                await run(self.runtime, stop_flag=self.stop_flag, ready_flag=self.ready_flag)
            finally:
                current = asyncio.current_task()
                self.leftovers = [repr(t) for t in asyncio.all_tasks() if t is not current and not t.done()]

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc

    async def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name="operator", daemon=True)
        self.thread.start()
        if not await asyncio.to_thread(self.ready_flag.wait, 10):
            raise AssertionError(f"the operator did not start: {self.error!r}")

    async def stop(self) -> None:
        self.stop_flag.set()
        assert self.thread is not None
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive(), "the operator did not stop"
        assert self.error is None, f"the operator failed: {self.error!r}"
        assert not self.leftovers, f"the operator left tasks behind: {self.leftovers}"


@dataclass
class Operators:
    emulator: Any
    running: list[OperatorHandle] = field(default_factory=list)

    def settings(self, **timing: Any) -> ControllerSettings:
        fast = {"debounce": 0.05, "drift_interval": 3600.0, "retry_backoff": (0.1, 1.0), **timing}
        return ControllerSettings(timing=TimingSettings(**fast), metrics_port=None, health_port=None,
                                  render=TEST_OPTIONS)

    async def start(self, settings: ControllerSettings | None = None) -> OperatorHandle:
        cfg = kubernetes.client.Configuration(host=url_of(self.emulator))
        handle = OperatorHandle(build_runtime(settings or self.settings(), cfg, Metrics()),
                                started_at=len(list(self.emulator)))
        self.running.append(handle)
        await handle.start()
        return handle

    async def stop_all(self) -> None:
        while self.running:
            await self.running.pop().stop()


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until ``check()`` returns something truthy without raising; return it."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = await check()
            if result:
                return result
            error: BaseException | None = None
        except AssertionError as exc:
            error = exc
        if time.monotonic() > deadline:
            if error is not None:
                raise error
            raise AssertionError(f"not true within {within}s: {check}")
        await asyncio.sleep(interval)


async def settled(op: OperatorHandle, emulator: Any, quiet: float = 0.4, within: float = 15.0) -> None:
    """Wait until the operator is idle and the emulator saw no request for ``quiet`` seconds."""
    deadline = time.monotonic() + within
    count, since = len(list(emulator)), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now_count = len(list(emulator))
        if now_count != count or op.runtime.scheduler.busy():
            count, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError("the operator did not settle")
