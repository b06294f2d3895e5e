"""Sidecar processes of a Serve replica: started, watched, restarted with backoff, stopped with it.

Used by ``deployments.dynamo_engine``: each Dynamo replica runs its frontend and/or worker this way. The
restart decisions are ``arks_ray.engines.sidecars.SidecarTracker``'s; this module does the I/O.

Ordering constraints:
- every sidecar starts in its own session (process group), so stopping it stops what it spawned;
- every sidecar runs under a small shim that stays its parent, with ``PR_SET_PDEATHSIG``: if the replica's
  process dies without running its destructor (``ray stop --force``, a replica killed by Serve), the kernel
  signals the shim, which kills the sidecar's whole process group, so no orphan (nor a child of the
  sidecar, such as vLLM's EngineCore) keeps a port or a GPU. The command line the shim starts is exactly
  the launch spec's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from arks_ray.engines.dynamo import LaunchSpec, sidecar_environ
from arks_ray.engines.sidecars import RestartPolicy, SidecarTracker

logger = logging.getLogger("ray.serve.arks.sidecars")

_SHIM = """
import ctypes, os, signal, subprocess, sys

def kill_group(*_):
    # The command's children too (vLLM's EngineCore outlives its API server otherwise), then this process.
    os.killpg(0, signal.SIGKILL)

def kill_the_rest():
    for stat in os.listdir("/proc"):
        try:
            pid = int(stat)
            pgrp = int(open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[2])
            if pgrp == os.getpgrp() and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        except (ValueError, OSError, IndexError):
            continue

def on_parent_death(parent):
    libc.prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGUSR1, kill_group)
    os.getppid() == parent or kill_group()  # it died already

libc = ctypes.CDLL(None)
on_parent_death(int(sys.argv[1]))  # the replica's process
shim = os.getpid()
if os.fork() == 0:
    # A watcher: when the replica's process dies, Ray kills its direct children, this shim among them,
    # possibly before the shim can act; the watcher, the shim's child, then clears the group.
    on_parent_death(shim)
    while True:
        signal.pause()
signal.signal(signal.SIGTERM, lambda *_: None)  # a SIGTERM to the group is the command's to handle
code = subprocess.Popen(sys.argv[2:]).wait()
kill_the_rest()  # what the command left behind when it exited, and the watcher
if code < 0:  # die of the same signal (SIGKILL and SIGSTOP take no handler)
    if -code not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""
"""The sidecar's parent, in the sidecar's own process group: it starts the command, exits as the command did,
and leaves nothing of the group behind, whether the command exits, the replica's process dies, or both the
replica's process and this shim are killed at once (as Ray kills a dead worker's children)."""
STOP_GRACE_S = 5.0


def shim_argv(argv: tuple[str, ...]) -> list[str]:
    """The command that runs ``argv`` under the shim, which kills its process group when this process dies."""
    return [sys.executable, "-c", _SHIM, str(os.getpid()), *argv]


class Sidecar:
    """One supervised process: its restart loop, its log file and its status."""

    def __init__(self, spec: LaunchSpec, log_dir: Path, *, policy: RestartPolicy | None = None,
                 base_env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.spec = spec
        self.tracker = SidecarTracker(spec.role, policy or RestartPolicy())
        self.log_path = log_dir / f"{spec.role}.log"
        self._env = sidecar_environ(os.environ if base_env is None else base_env, spec)
        self._clock, self._sleep = clock, sleep
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        """Set when the restart loop ends: stopped, or failed for good."""

    @property
    def pid(self) -> int | None:
        proc = self.process
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def failed(self) -> bool:
        return self.tracker.state == "failed"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"sidecar-{self.spec.role}")

    async def _loop(self) -> None:
        try:
            while True:
                code = await self._run_once()
                decision = self.tracker.exited(self._clock(), code)
                if self.tracker.state == "stopped":
                    return
                if decision.delay_s is None:
                    logger.error("%s\n--- last lines of %s:\n%s", decision.reason, self.log_path, self.log_tail())
                    return
                logger.warning(decision.reason)
                await self._sleep(decision.delay_s)
        finally:
            self.done.set()

    def _open_log(self) -> BinaryIO:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the caller once the child has it
        log.write(f"\n=== arks-ray: start {self.tracker.starts + 1}: {self.spec.command()}\n".encode())
        log.flush()
        return log

    async def _run_once(self) -> int | None:
        with self._open_log() as log:
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *shim_argv(self.spec.argv), stdin=asyncio.subprocess.DEVNULL, stdout=log,
                    stderr=asyncio.subprocess.STDOUT, env=self._env, start_new_session=True)
            except OSError as exc:
                log.write(f"=== arks-ray: could not start: {exc}\n".encode())
                return None
        self.tracker.started(self._clock())
        logger.info("started %s (pid %s): %s", self.spec.role, self.process.pid, self.spec.command())
        return await self.process.wait()

    async def kill(self) -> None:
        """Kill the current process (e.g. it stopped answering); the restart loop starts it again."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)

    async def stop(self) -> None:
        """Stop for good: SIGTERM to the process group, SIGKILL after the grace period."""
        self.tracker.stopped()
        proc = self.process
        if proc is not None and proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await proc.wait()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def log_tail(self, limit: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        return {"role": self.spec.role, "pid": self.pid, "command": self.spec.command(),
                "log": str(self.log_path), **self.tracker.snapshot()}


def loopback_session(keep_alive_s: float | None = None) -> Any:
    """The aiohttp session a replica speaks to its own sidecar server with: no cap on connections (Serve's
    ``max_ongoing_requests`` bounds the streams; aiohttp's default cap of 100 would queue the 101st), no total
    timeout (streams are long), 5 s to connect; ``keep_alive_s`` for idle connections (aiohttp's default: 15 s)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0) if keep_alive_s is None else \
        aiohttp.TCPConnector(limit=0, keepalive_timeout=keep_alive_s)
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5), connector=connector)


async def wait_ready(ready: Callable[[], Awaitable[bool]], failure: Callable[[], str | None], timeout_s: float,
                     too_long: str) -> float:
    """Poll ``ready`` until it says so; seconds it took. Raises RuntimeError with ``failure()`` once a sidecar has
    failed for good, and TimeoutError with ``too_long`` past ``timeout_s``."""
    started = time.monotonic()
    while not await ready():
        failed = failure()
        if failed:
            raise RuntimeError(failed)
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(too_long)
        await asyncio.sleep(0.25)
    return time.monotonic() - started
