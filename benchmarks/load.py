"""What the in-process gateway benchmarks share: an ASGI app served on loopback, and a closed-loop load.

Used by ``gateway_redesign.py`` and ``observability_overhead.py`` (imported from this folder, which each
script puts on ``sys.path``; the ``before`` side of ``gateway_redesign`` runs another checkout's code, so
this module must not import the project).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

Request = Callable[[int], tuple[dict[str, Any], dict[str, str]]]
"""The i-th request of a load: its JSON body and its headers."""


def serve(app: Any) -> tuple[int, Any]:
    """``app`` on a free loopback port, in a daemon thread: its port, and the uvicorn server (``should_exit``)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off",
                                           access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return port, server


async def closed_loop(port: int, n: int, concurrency: int, request: Request,
                      path: str = "/v1/chat/completions") -> dict[str, float]:
    """``n`` requests from ``concurrency`` workers, each sending its next one when the last is answered
    (every answer must be 200): requests/s and latency p50/p99."""
    import httpx

    latencies: list[float] = []
    todo = iter(range(n))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        async def worker() -> None:
            for i in todo:
                body, headers = request(i)
                t0 = time.perf_counter()
                resp = await client.post(path, json=body, headers=headers)
                assert resp.status_code == 200, resp.text
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"rps": n / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}
