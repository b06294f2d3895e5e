"""``HttpBackends`` against a real HTTP server on loopback (aiohttp), scripted per test.

The real OpenAI-compatible peer (``vllm serve``) is exercised end to end in ``tests/e2e/test_routing.py``;
here the server misbehaves on purpose: events split across writes, errors, streams cut short.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from arks_ray.api.gateway import Backend
from arks_ray.engines.protocol import SseSplitter
from arks_ray.gateway.settings import GatewaySettings
from deployments.backends import HttpBackends, RoutedBackends

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK = {"choices": [{"delta": {"content": "hé"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def collect(gen: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in gen]


def run(handler: Handler, kind: str, body: dict[str, Any], client_usage: bool = False) -> tuple[list[Any], list[Any]]:
    seen: list[Any] = []

    async def main() -> list[Any]:
        async def recording(request: web.Request) -> web.StreamResponse:
            seen.append((request.path, dict(request.headers), await request.json()))
            return await handler(request)

        runner, url = await serve(recording)
        backends = HttpBackends(GatewaySettings())
        try:
            return await collect(backends.open(Backend(kind="http", name="ext", weight=1, url=url), kind, body,
                                               client_usage))
        finally:
            await backends.close()
            await runner.cleanup()

    return asyncio.run(main()), seen


def sse(*events: Any) -> bytes:
    return b"".join(f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n".encode() for e in events)


async def stream_in_pieces(request: web.Request, payload: bytes, sizes: int = 7) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(0, len(payload), sizes):
        await resp.write(payload[i:i + sizes])  # events and UTF-8 characters cut anywhere
    await resp.write_eof()
    return resp


def test_a_stream_is_reassembled_into_events_and_its_usage_is_taken_out() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_in_pieces(request, sse(CHUNK, CHUNK, USAGE, "[DONE]"))

    items, seen = run(handler, "chat", {"model": "m", "stream": True, "messages": []})
    text = "".join(i for i in items if isinstance(i, str))
    assert text == sse(CHUNK, CHUNK, "[DONE]").decode()
    assert items[-1] == {"arks": "usage", "usage": USAGE["usage"], "completion_tokens": 2}
    path, headers, body = seen[0]
    assert path == "/v1/chat/completions"
    assert body["stream_options"] == {"include_usage": True}  # always asked for, for metering
    assert "Authorization" not in headers  # the client's token never leaves the gateway


def test_the_client_gets_the_usage_chunk_when_it_asked() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_in_pieces(request, sse(CHUNK, USAGE, "[DONE]"))

    items, _ = run(handler, "completions", {"model": "m", "stream": True, "prompt": "x",
                                            "stream_options": {"include_usage": True}}, client_usage=True)
    assert '"usage"' in "".join(i for i in items if isinstance(i, str))


def test_a_stream_cut_before_done_ends_with_an_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_in_pieces(request, sse(CHUNK))

    items, _ = run(handler, "chat", {"model": "m", "stream": True})
    assert (items[-1]["arks"], items[-1]["status"]) == ("error", 502)
    assert "before [DONE]" in items[-1]["body"]["error"]["message"]


def test_a_whole_response_passes_through() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": "c1", "usage": USAGE["usage"]})

    items, seen = run(handler, "embeddings", {"model": "m", "input": "x"})
    assert items == [{"arks": "response", "status": 200, "body": {"id": "c1", "usage": USAGE["usage"]}}]
    assert seen[0][0] == "/v1/embeddings"
    assert "stream_options" not in seen[0][2]


@pytest.mark.parametrize(("status", "payload", "want_status", "want_message"), [
    (400, {"error": {"message": "max_tokens is too large", "param": "max_tokens"}}, 400, "max_tokens is too large"),
    (404, {"error": "no such model"}, 404, "no such model"),
    (500, {"error": {"message": "CUDA out of memory"}}, 502, "failed with HTTP 500: CUDA out of memory"),
    (503, "upstream overloaded", 502, "upstream overloaded"),
])
def test_errors_keep_the_upstream_message(status: int, payload: Any, want_status: int, want_message: str) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if isinstance(payload, str):
            return web.Response(status=status, text=payload)
        return web.json_response(payload, status=status)

    (item,), _ = run(handler, "chat", {"model": "m"})
    assert (item["arks"], item["status"]) == ("error", want_status)
    assert want_message in item["body"]["error"]["message"]


def test_invalid_json_is_a_backend_failure() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>proxy error</html>")

    (item,), _ = run(handler, "chat", {"model": "m"})
    assert (item["status"], item["body"]["error"]["type"]) == (502, "server_error")


def test_probe_http_tells_up_from_down() -> None:
    async def main() -> list[tuple[bool, str]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response({"data": []}, status=200 if request.path == "/v1/models" else 500)

        runner, url = await serve(handler)
        backends = RoutedBackends(GatewaySettings(health_check_timeout_s=1))
        try:
            up = await backends.probe_http(Backend(kind="http", name="a", weight=1, url=url))
            sick = await backends.probe_http(Backend(kind="http", name="b", weight=1, url=url + "/broken"))
            down = await backends.probe_http(Backend(kind="http", name="c", weight=1, url="http://127.0.0.1:9"))
            return [up, sick, down]
        finally:
            await backends.close()
            await runner.cleanup()

    (up, _), (sick, why), (down, why_down) = asyncio.run(main())
    assert (up, sick, down) == (True, False, False)
    assert "HTTP 500" in why
    assert "ClientConnectorError" in why_down


def test_sse_splitter_keeps_a_trailing_event_without_its_blank_line() -> None:
    s = SseSplitter()
    assert s.feed(b"data: a\n\ndata: b") == "data: a\n\n"
    assert s.rest() == "data: b\n\n"
