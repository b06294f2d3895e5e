"""Fixtures of the counter-store contract suite: a real redis-server, and ``store`` over both backends.

Every test in this folder that takes ``store`` runs twice, against ``MemoryStore`` and against a
``RedisStore`` on a redis-server started here (one per session, on a free loopback port, without
persistence). The Redis cases carry the ``integration`` marker. A missing redis-server fails the Redis
cases loudly instead of skipping them, because CI installs it (``make sysdeps``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from arks_ray.gateway.ports import CounterStore
from arks_ray.stores.memory import MemoryStore
from arks_ray.stores.redis import RedisStore

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on a fixed port, which a test may kill, freeze and start again."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        """A fresh synchronous client (for set-up, flushing and ``INFO``); close it after use."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> None:
        """Start the server and return once it answers PING (a restart starts empty: no data, no scripts)."""
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir)],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.workdir}/redis.log")
            client = self.client()
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S}s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the abrupt death a store must survive (open connections are reset)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a frozen process must be able to die
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def flush(self) -> None:
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the whole session, killed at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: install it (`make sysdeps`, or `apt-get install redis-server`). "
                    "The counter-store contract suite runs against a real Redis and does not skip.", pytrace=False)
    server = RedisServer(binary, free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_control(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, for tests that kill, freeze or restart it; it is running again afterwards."""
    yield redis_server
    if redis_server.running:
        redis_server.thaw()
    else:
        redis_server.start()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    """A ``RedisStore`` on an empty database, made on the test's event loop."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flush()
    store = RedisStore(redis_server.url)
    yield store
    await store.close()


@pytest.fixture(params=[
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.integration),
])
def store(request: pytest.FixtureRequest) -> CounterStore:
    """Each implementation of ``CounterStore`` in turn: the contract suite holds them to one behaviour."""
    if request.param == "memory":
        return MemoryStore()
    redis_store: CounterStore = request.getfixturevalue("redis_store")
    return redis_store
