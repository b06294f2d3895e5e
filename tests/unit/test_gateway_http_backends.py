"""``HttpBackends`` against a real HTTP server on loopback (aiohttp), scripted per test.

The real OpenAI-compatible peer (``vllm serve``) is exercised end to end in ``tests/e2e/test_routing.py``;
here the server misbehaves on purpose: events split across writes, errors, streams cut short, usage on a
content chunk. What comes back is the gateway's typed items; no failure a client sees names the upstream's
address or repeats a 5xx's text.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from arks_ray.api.gateway import Backend
from arks_ray.engines.protocol import DONE, Answer, Chunk, EngineItem, EngineRequest, Failure, Final
from arks_ray.engines.sse import SseSplitter
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


async def collect(gen: AsyncIterator[EngineItem]) -> list[EngineItem]:
    return [item async for item in gen]


def text_of(items: list[EngineItem]) -> str:
    return "".join(i.text for i in items if isinstance(i, Chunk))


def run(handler: Handler, kind: str, body: dict[str, Any], client_usage: bool = False,
        url: str | None = None) -> tuple[list[EngineItem], list[Any]]:
    seen: list[Any] = []

    async def main() -> list[EngineItem]:
        async def recording(request: web.Request) -> web.StreamResponse:
            seen.append((request.path, dict(request.headers), await request.json()))
            return await handler(request)

        runner, served = await serve(recording)
        backends = HttpBackends(GatewaySettings(http_connect_timeout_s=2))
        try:
            stream = backends.open(Backend(kind="http", name="ext", weight=1, url=url or served),
                                   EngineRequest(kind, body, client_usage))
            return await collect(aiter(stream))
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
    assert text_of(items) == sse(CHUNK, CHUNK, "[DONE]").decode()
    assert items[-1] == Final(USAGE["usage"], 2)
    assert all(isinstance(i, Chunk) for i in items[:-1])
    path, headers, body = seen[0]
    assert path == "/v1/chat/completions"
    assert body["stream_options"] == {"include_usage": True}  # always asked for, for metering
    assert "Authorization" not in headers  # the client's token never leaves the gateway


def test_the_client_gets_the_usage_chunk_when_it_asked() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_in_pieces(request, sse(CHUNK, USAGE, "[DONE]"))

    items, _ = run(handler, "completions", {"model": "m", "stream": True, "prompt": "x",
                                            "stream_options": {"include_usage": True}}, client_usage=True)
    assert text_of(items) == sse(CHUNK, USAGE, "[DONE]").decode()
    assert items[-1] == Final(USAGE["usage"], 1)


@pytest.mark.parametrize("client_usage", [False, True])
def test_usage_on_the_last_content_chunk_is_metered_and_stripped_unless_asked(client_usage: bool) -> None:
    last = {"choices": [{"delta": {"content": "!"}, "finish_reason": "stop"}], "usage": USAGE["usage"]}

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_in_pieces(request, sse(CHUNK, last, "[DONE]"))

    items, _ = run(handler, "chat", {"model": "m", "stream": True}, client_usage=client_usage)
    assert items[-1] == Final(USAGE["usage"], 2)  # metered either way, the content event counted
    events = [json.loads(e[6:]) for e in text_of(items).split("\n\n") if e.startswith("data: {")]
    assert events[-1]["choices"] == last["choices"]  # the content is always forwarded
    assert ("usage" in events[-1]) is client_usage
    assert text_of(items).endswith(DONE)


def test_a_stream_cut_before_done_ends_with_an_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_in_pieces(request, sse(CHUNK))

    items, _ = run(handler, "chat", {"model": "m", "stream": True})
    assert text_of(items) == sse(CHUNK).decode()
    assert items[-1] == Failure("engine", 502, "backend 'ext' ended its stream before [DONE]")


def test_a_whole_response_passes_through() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": "c1", "usage": USAGE["usage"]})

    items, seen = run(handler, "embeddings", {"model": "m", "input": "x"})
    assert items == [Answer({"id": "c1", "usage": USAGE["usage"]}, 200)]
    assert seen[0][0] == "/v1/embeddings"
    assert "stream_options" not in seen[0][2]


@pytest.mark.parametrize(("status", "payload", "want"), [
    (400, {"error": {"message": "max_tokens is too large", "param": "max_tokens"}},
     Failure("invalid", 400, "max_tokens is too large", "max_tokens")),
    (404, {"error": "no such model"}, Failure("invalid", 404, "no such model")),
    (422, {"message": "bad field"}, Failure("invalid", 422, "bad field")),
    (429, {"error": {"message": "slow down"}}, Failure("unavailable", 503, "backend 'ext' failed with HTTP 429")),
    (408, "", Failure("timeout", 504, "backend 'ext' failed with HTTP 408")),
    (500, {"error": {"message": "CUDA out of memory at /opt/vllm on 10.0.0.7"}},
     Failure("engine", 502, "backend 'ext' failed with HTTP 500")),
    (503, "upstream overloaded", Failure("unavailable", 503, "backend 'ext' failed with HTTP 503")),
])
def test_errors_are_classified_and_only_a_client_error_keeps_its_text(status: int, payload: Any,
                                                                        want: Failure) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if isinstance(payload, str):
            return web.Response(status=status, text=payload)
        return web.json_response(payload, status=status)

    (item,), _ = run(handler, "chat", {"model": "m"})
    assert item == want
    assert want.blames_backend is (status >= 500 or status in (408, 429))


def test_an_unreachable_backend_is_503_without_its_address() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise AssertionError("never reached")

    (item,), seen = run(handler, "chat", {"model": "m"}, url="http://127.0.0.1:9")
    assert item == Failure("unavailable", 503, "backend 'ext' is not reachable")
    assert "127.0.0.1" not in str(item.body())
    assert seen == []


def test_invalid_json_is_a_backend_failure() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>proxy error</html>")

    (item,), _ = run(handler, "chat", {"model": "m"})
    assert item == Failure("engine", 502, "backend 'ext' answered with invalid JSON")
    assert item.body()["error"]["type"] == "server_error"


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


def test_more_than_a_hundred_streams_are_relayed_at_once() -> None:
    """aiohttp caps a session at 100 connections unless told otherwise: the 101st stream would wait for a
    connection while the first hundred wait for it (the server answers only once all have arrived)."""
    streams = 120

    async def main() -> list[list[EngineItem]]:
        arrived, everyone = 0, asyncio.Event()

        async def handler(request: web.Request) -> web.StreamResponse:
            nonlocal arrived
            arrived += 1
            if arrived == streams:
                everyone.set()
            await everyone.wait()
            return await stream_in_pieces(request, sse(CHUNK, USAGE, "[DONE]"), sizes=1 << 10)

        runner, url = await serve(handler)
        backends = HttpBackends(GatewaySettings())
        backend = Backend(kind="http", name="ext", weight=1, url=url)
        try:
            opened = [backends.open(backend, EngineRequest("chat", {"model": "m", "stream": True}, False))
                      for _ in range(streams)]
            return await asyncio.wait_for(asyncio.gather(*(collect(aiter(s)) for s in opened)), 20)
        finally:
            await backends.close()
            await runner.cleanup()

    results = asyncio.run(main())
    assert [r[-1] for r in results] == [Final(USAGE["usage"], 1)] * streams


def test_a_cap_on_connections_is_a_setting() -> None:
    async def main() -> int:
        backends = HttpBackends(GatewaySettings(http_max_connections=7))
        try:
            return backends.client().connector.limit
        finally:
            await backends.close()

    assert asyncio.run(main()) == 7


def paced_reads(chunks: list[bytes], interval_s: float) -> tuple[list[bytes], list[tuple[int, float]]]:
    """``paced`` over ``chunks`` on a fake clock: what it yields, and (chunks read so far, seconds) per sleep."""
    from arks_ray.engines.sse import paced

    now, sleeps, read = [0.0], [], [0]

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            read[0] += 1
            now[0] += 0.001  # each read takes a millisecond
            yield chunk

    async def sleep(s: float) -> None:
        sleeps.append((read[0], round(s, 6)))
        now[0] += s

    async def main() -> list[bytes]:
        return [c async for c in paced(source(), interval_s, clock=lambda: now[0], sleep=sleep)]

    return asyncio.run(main()), sleeps


def test_paced_reads_hold_neither_the_first_token_nor_the_end() -> None:
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    token = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    chunks = [role, token, token + token, token + b"data: [DONE]\n\n"]
    out, sleeps = paced_reads(chunks, 0.1)
    assert out == chunks  # nothing lost, nothing reordered
    # No wait after the role alone (the first token follows at once) and none after [DONE]: a wait after
    # the first token's read and after the next one.
    assert sleeps == [(2, 0.1), (3, 0.1)]


def test_paced_reads_with_no_interval_never_wait() -> None:
    token = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    out, sleeps = paced_reads([token] * 5, 0)
    assert out == [token] * 5
    assert sleeps == []


def test_a_paced_stream_arrives_in_fewer_items_and_whole() -> None:
    """A real server writing a token every 5 ms: read once per 50 ms, the same text comes in far fewer items,
    and the first token is not held back."""
    tokens = 40

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(tokens):
            await resp.write(sse(CHUNK))
            await asyncio.sleep(0.005)
        await resp.write(sse(USAGE, "[DONE]"))
        await resp.write_eof()
        return resp

    def relayed(interval_ms: float) -> tuple[list[EngineItem], float]:
        async def main() -> tuple[list[EngineItem], float]:
            runner, url = await serve(handler)
            settings = GatewaySettings(http_stream_interval_ms=interval_ms, http_stream_interval_max_ms=interval_ms)
            backends = HttpBackends(settings)
            try:
                stream = backends.open(Backend(kind="http", name="ext", weight=1, url=url),
                                       EngineRequest("chat", {"model": "m", "stream": True}, False))
                t0, first, items = time.monotonic(), 0.0, []
                async for item in aiter(stream):
                    first = first or time.monotonic() - t0
                    items.append(item)
                return items, first
            finally:
                await backends.close()
                await runner.cleanup()

        return asyncio.run(main())

    every, _ = relayed(0)
    coalesced, first_s = relayed(50)
    assert text_of(coalesced) == text_of(every) == sse(*[CHUNK] * tokens, "[DONE]").decode()
    assert coalesced[-1] == every[-1] == Final(USAGE["usage"], tokens)
    assert len(coalesced) <= 10 < len(every)  # about 200 ms of stream read every 50 ms, against ~40 reads
    assert first_s < 0.05


def test_the_read_interval_follows_the_streams_in_flight() -> None:
    backends = HttpBackends(GatewaySettings(http_stream_interval_ms=50, http_stream_interval_max_ms=200))
    assert backends.interval_s() == 0.05
    backends.streams = 127  # a 128th stream: twice the knee of 64
    assert backends.interval_s() == 0.1
    backends.streams = 1000
    assert backends.interval_s() == 0.2
    assert HttpBackends(GatewaySettings()).interval_s() == 0.1  # by default as an engine app coalesces
    assert HttpBackends(GatewaySettings(http_stream_interval_ms=0)).interval_s() == 0


def test_the_log_names_no_upstream_address(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise AssertionError("never reached")

    with caplog.at_level("WARNING", logger="ray.serve.arks.upstream"):
        (item,), _ = run(handler, "chat", {"model": "m"}, url="http://127.0.0.1:9")
    assert item == Failure("unavailable", 503, "backend 'ext' is not reachable")
    assert "is not reachable: ClientConnectorError (ECONNREFUSED)" in caplog.text
    assert "127.0.0.1" not in caplog.text


def _keep_alive_server(drop: Callable[[int, int], bool]) -> Any:
    """A plain HTTP/1.1 server on loopback that answers each request with one JSON body on a kept-alive
    connection, except that it closes the connection, unanswered, when ``drop(connection_no, request_no)``:
    as a server does when it times out an idle keep-alive connection just as a request goes out on it."""
    counts = {"connections": 0, "requests": 0, "answered": 0}

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts["connections"] += 1
        conn, n = counts["connections"], 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                n += 1
                counts["requests"] += 1
                if drop(conn, n):
                    writer.transport.abort()  # no status line: the client sees the connection die
                    return
                body = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                counts["answered"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return on_connection, counts


def test_a_stale_kept_alive_connection_is_sent_on_again_once() -> None:
    """aiohttp retries only idempotent methods on a connection the server dropped; a POST to an engine found
    its pooled connection closed (vLLM's server closes idle ones after 5 s, aiohttp keeps them 15 s) and
    failed with a 502 once in ~2000 requests on the H200. It is sent again on a new connection; a connection
    that dies before the answer twice is still the backend's failure, sent no third time."""
    async def main(drop: Callable[[int, int], bool]) -> tuple[list[EngineItem], dict[str, int]]:
        on_connection, counts = _keep_alive_server(drop)
        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        backends = HttpBackends(GatewaySettings(http_connect_timeout_s=2))
        try:
            items = []
            for _ in range(2):
                stream = backends.open(Backend(kind="http", name="ext", weight=1, url=url),
                                       EngineRequest("chat", {"model": "m"}, False))
                items += await collect(aiter(stream))
            return items, counts
        finally:
            await backends.close()
            server.close()

    # The second request goes out on the first's connection, which the server closes unanswered.
    items, counts = asyncio.run(main(lambda conn, n: conn == 1 and n == 2))
    assert [type(i) for i in items] == [Answer, Answer]
    assert counts == {"connections": 2, "requests": 3, "answered": 2}
    # Every connection dies at its first request: one more try, then the failure, without the address.
    items, counts = asyncio.run(main(lambda conn, n: True))
    assert items == [Failure("engine", 502, "backend 'ext' failed mid-answer (ServerDisconnectedError)")] * 2
    assert counts["requests"] == 4
    assert "127.0.0.1" not in json.dumps([i.body() for i in items if isinstance(i, Failure)])


def test_a_paced_stream_is_not_held_past_its_end() -> None:
    """Read once per interval, a stream's last tokens and [DONE] still leave as soon as the upstream ends its
    answer, not an interval later: held, every stream would end up to an interval late (Ray's batcher does not
    hold the end either). An interval of 5 s against an end 50 ms after the first token."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(CHUNK, CHUNK))
        await asyncio.sleep(0.05)
        await resp.write(sse(CHUNK, USAGE, "[DONE]"))
        await resp.write_eof()
        return resp

    async def main() -> tuple[list[EngineItem], float]:
        runner, url = await serve(handler)
        backends = HttpBackends(GatewaySettings(http_stream_interval_ms=5000, http_stream_interval_max_ms=5000))
        try:
            t0 = time.monotonic()
            stream = backends.open(Backend(kind="http", name="ext", weight=1, url=url),
                                   EngineRequest("chat", {"model": "m", "stream": True}, False))
            items = [item async for item in aiter(stream)]
            return items, time.monotonic() - t0
        finally:
            await backends.close()
            await runner.cleanup()

    items, took = asyncio.run(main())
    assert text_of(items) == sse(CHUNK, CHUNK, CHUNK, "[DONE]").decode()
    assert items[-1] == Final(USAGE["usage"], 3)
    assert took < 2.5  # not the 5 s interval
