"""The Dynamo proxy (``deployments.dynamo_engine.frontend_upstream``, an ``Upstream``): the gateway's typed
items on top of a fake Dynamo frontend (an aiohttp server on loopback that answers the way
``dynamo.frontend`` 1.6.1 does)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from arks_ray.engines.protocol import Answer, Chunk, EngineItem, EngineRequest, Failure, Final
from arks_ray.engines.sidecars import Liveness
from deployments.dynamo_apps import actor_options
from deployments.dynamo_engine import DynamoServer, DynamoWorker, SidecarConfig, frontend_upstream
from deployments.upstream import Upstream
from tests.support.redis_server import free_port

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

USAGE = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}


def chunk(content: str | None = None, usage: dict[str, int] | None = None) -> str:
    data: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "served", "choices": []}
    if content is not None:
        data["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    if usage is not None:
        data["usage"] = usage
    return "data: " + json.dumps(data) + "\n\n"


class FakeFrontend:
    """Records what it was sent and answers per the request's ``mode`` field."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        mode = body.get("mode", "ok")
        if mode == "not-found":
            return web.json_response({"message": "Model not found", "type": "Not Found", "code": 404}, status=404)
        if mode == "bad":
            return web.json_response({"message": "Failed to deserialize the JSON body", "type": "Bad Request",
                                      "code": 400}, status=400)
        if not body.get("stream"):
            return web.json_response({"object": "chat.completion", "model": body["model"], "usage": USAGE,
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if mode == "slow":  # a token every 20 ms, as an engine decodes
            for n in range(10):
                await resp.write(chunk(str(n)).encode())
                await asyncio.sleep(0.02)
            await resp.write(chunk(usage=USAGE).encode() + b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        events = chunk("he") + chunk("llo")
        if body.get("stream_options", {}).get("include_usage"):
            events += chunk(usage=USAGE)
        if mode != "cut":
            events += "data: [DONE]\n\n"
        # Split mid-event, as TCP may: the proxy must reassemble whole events.
        for i in range(0, len(events), 17):
            await resp.write(events[i:i + 17].encode())
        await resp.write_eof()
        return resp


@pytest.fixture
async def frontend() -> AsyncIterator[tuple[FakeFrontend, Upstream]]:
    fake = FakeFrontend()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    session = aiohttp.ClientSession()
    try:
        yield fake, frontend_upstream("dyn-app", "served", f"http://127.0.0.1:{port}", session)
    finally:
        await session.close()
        await runner.cleanup()


async def collect(proxy: Upstream, body: dict[str, Any], client_usage: bool = False,
                  kind: str = "chat") -> list[EngineItem]:
    return [item async for item in proxy.generate(EngineRequest(kind, body, client_usage))]


def text_of(items: list[EngineItem]) -> str:
    return "".join(i.text for i in items if isinstance(i, Chunk))


async def test_a_whole_answer_is_a_response_with_the_served_model(frontend: Any) -> None:
    fake, proxy = frontend
    (item,) = await collect(proxy, {"model": "endpoint-name", "messages": []})
    assert isinstance(item, Answer)
    assert item.status == 200
    assert item.body["usage"] == USAGE
    assert fake.seen[0]["model"] == "served"  # the frontend knows the model by its served name
    assert "stream_options" not in fake.seen[0]


async def test_a_stream_always_asks_for_usage_and_strips_it_unless_wanted(frontend: Any) -> None:
    fake, proxy = frontend
    items = await collect(proxy, {"model": "m", "messages": [], "stream": True})
    assert fake.seen[0]["stream_options"] == {"include_usage": True}
    text = text_of(items)
    assert '"usage"' not in text
    assert text.count("data: {") == 2
    assert text.endswith("data: [DONE]\n\n")
    assert items[-1] == Final(USAGE, 2)


async def test_a_stream_keeps_the_usage_chunk_when_the_client_asked(frontend: Any) -> None:
    _, proxy = frontend
    items = await collect(proxy, {"messages": [], "stream": True, "stream_options": {"include_usage": True}},
                          client_usage=True)
    assert text_of(items).count('"usage"') == 1
    assert items[-1] == Final(USAGE, 2)


async def test_a_stream_cut_before_done_is_an_error_after_what_arrived(frontend: Any) -> None:
    _, proxy = frontend
    items = await collect(proxy, {"messages": [], "stream": True, "mode": "cut"})
    assert text_of(items).count("data: {") == 2
    assert items[-1] == Failure("engine", 502, "application dyn-app ended its stream before [DONE]")


async def test_dynamo_errors_become_openai_errors(frontend: Any) -> None:
    _, proxy = frontend
    (bad,) = await collect(proxy, {"messages": [], "mode": "bad"})
    assert bad == Failure("invalid", 400, "Failed to deserialize the JSON body")
    assert bad.body()["error"]["type"] == "invalid_request_error"
    (gone,) = await collect(proxy, {"messages": [], "mode": "not-found"})
    # The frontend forgets the model while its worker restarts: that is unavailability (retried elsewhere,
    # held against the backend), not a client error; its text stays in the log.
    assert gone == Failure("unavailable", 503, "application dyn-app failed with HTTP 503")
    assert gone.blames_backend
    assert gone.body()["error"]["type"] == "server_error"


async def test_unknown_kinds_and_an_unreachable_frontend() -> None:
    async with aiohttp.ClientSession() as session:
        port = free_port()
        proxy = frontend_upstream("dyn-app", "served", f"http://127.0.0.1:{port}", session)
        (unknown,) = await collect(proxy, {}, kind="images")
        assert unknown == Failure("invalid", 404, "this model does not serve /v1/images", code="unsupported_endpoint")
        (down,) = await collect(proxy, {"messages": []})
        assert down == Failure("unavailable", 503, "application dyn-app is not reachable")
        assert str(port) not in str(down.body())  # no address in what a client sees


def test_a_replica_holds_its_bundles_resources() -> None:
    assert actor_options([{"arks-wg-x": 1, "CPU": 1.0}]) == {"num_cpus": 1.0, "num_gpus": 0,
                                                               "resources": {"arks-wg-x": 1}}
    pd = actor_options([{"arks-wg-x": 1, "GPU": 1}, {"arks-wg-x": 1, "GPU": 1}], "H100")
    assert pd == {"num_cpus": 0, "num_gpus": 2, "resources": {"arks-wg-x": 2}, "accelerator_type": "H100"}


async def test_a_worker_that_keeps_crashing_fails_the_health_check_naming_the_app(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho \"boom: $*\"\nexit 4\n")
    fake_python.chmod(0o755)
    monkeypatch.setenv("ARKS_DYNAMO_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    worker = DynamoWorker.__new__(DynamoWorker)  # Serve builds replicas this way, then awaits __init__
    await worker.__init__({"app": "dyn-app", "engine": "mocker", "model_path": "/m", "served_name": "served",
                           "namespace": "arks-default-dyn-app", "run_id": "t1", "mode": "decode",
                           "run_frontend": False, "python": str(fake_python), "max_restarts": 1,
                           "initial_backoff_s": 0})
    (sidecar,) = worker.sidecars.items
    await asyncio.wait_for(sidecar.done.wait(), 30)
    with pytest.raises(RuntimeError) as failed:
        await worker.check_health()
    message = str(failed.value)
    assert message.startswith("application dyn-app: decode exited with code 4; 2 exits within 300s, giving up")
    assert "boom: -m dynamo.mocker --model-path /m --model-name served --disaggregation-mode decode" in message
    assert (tmp_path / "state/arks-default-dyn-app-t1/discovery").is_dir()
    await worker.__del__()


PD_ARGS: dict[str, Any] = {
    "name": "pd", "runtime": "dynamo", "dynamo": {"engine": "mocker", "args": [], "namespace": "arks-default-pd"},
    "router": {"replicas": 1, "args": []},
    **{role: {"model_loading_config": {"model_id": "pd", "model_source": "/m"}, "engine_kwargs": {}, "args": [],
              "deployment_config": {"num_replicas": 1},
              "placement_group_config": {"bundles": [{"arks-wg-g": 1, "CPU": 1.0}], "strategy": "PACK"}}
       for role in ("prefill", "decode")},
}


def test_pd_args_build_an_app_and_bad_ones_name_the_app() -> None:
    from ray.serve import Application

    from deployments.disaggregated import build_app

    assert isinstance(build_app(PD_ARGS), Application)
    with pytest.raises(ValueError, match=r"application pd: invalid Dynamo PD args \(KeyError: 'decode'\)"):
        build_app({k: v for k, v in PD_ARGS.items() if k != "decode"})
    bad = {**PD_ARGS, "dynamo": {"engine": "mocker", "args": ["--model-name x"]}}
    with pytest.raises(ValueError, match=r"application pd: dynamo\.args: --model-name is set by servedModelName"):
        build_app(bad)


class FakeFrontendSidecar:
    pid = 4242

    def __init__(self) -> None:
        self.kills = 0
        self.tracker = SimpleNamespace(starts=1)

    async def kill(self) -> None:
        self.kills += 1
        self.tracker.starts += 1  # the supervisor starts it again


class FakeSidecars:
    stopping = True  # nothing to stop when the server is collected

    def __init__(self) -> None:
        self.frontend = FakeFrontendSidecar()

    def failure(self) -> None:
        return None

    def role(self, role: str) -> FakeFrontendSidecar | None:
        return self.frontend if role == "frontend" else None


async def test_a_frontend_that_stops_answering_is_killed_after_three_health_checks() -> None:
    server = DynamoServer.__new__(DynamoServer)
    server.config = SidecarConfig(app="dyn-app", model_path="/m", served_name="s", namespace="n", run_id="r")
    server.sidecars = FakeSidecars()  # type: ignore[assignment]
    server.base = f"http://127.0.0.1:{free_port()}"  # nothing listens: /live never answers
    server._liveness = Liveness(misses=3, startup_s=60)
    server._liveness.check(1, time.monotonic(), True)  # start 1 answered once, then stopped answering
    async with aiohttp.ClientSession() as server.session:
        await server.check_health()
        await server.check_health()
        assert server.sidecars.frontend.kills == 0  # type: ignore[attr-defined]
        await server.check_health()  # the third miss: killed, so the supervisor restarts it
        assert server.sidecars.frontend.kills == 1  # type: ignore[attr-defined]
        for _ in range(5):  # start 2 has not answered yet: it is starting, and has 60 s for that
            await server.check_health()
        assert server.sidecars.frontend.kills == 1  # type: ignore[attr-defined]


async def test_the_replica_reads_the_frontends_stream_at_its_cadence(frontend: Any) -> None:
    """Each item through Serve costs CPU in every hop: a Dynamo replica reads its frontend's stream once per
    interval (the first output at once), as the vLLM apps coalesce theirs; ``user_config`` changes it live."""
    _, proxy = frontend
    server = DynamoServer.__new__(DynamoServer)  # the replica's request path, without its sidecars
    server.config = SimpleNamespace(app="dyn-app", served_name="served")
    server.base, server.session = proxy.base, proxy._session()
    server.interval_ms, server.interval_max_ms, server.in_flight = 100.0, 200.0, 0
    server.sidecars = SimpleNamespace(stopping=True)  # nothing to stop when it is collected

    async def items() -> list[EngineItem]:
        got = [i async for i in server.generate(EngineRequest("chat", {"mode": "slow", "stream": True}, False))]
        assert server.in_flight == 0
        return got

    paced = await items()
    assert "".join(re.findall(r'"content": "(\d)"', text_of(paced))) == "0123456789"
    assert isinstance(paced[-1], Final)
    assert paced[-1].usage == USAGE  # metered off the frontend's usage chunk
    assert len(paced) <= 5  # ~200 ms of tokens: the first at once, then about one read per 100 ms
    server.reconfigure({"stream_interval_ms": 0})  # no coalescing: every event as it comes
    assert len(await items()) >= 10
    with pytest.raises(ValueError, match=r"user_config\.stream_interval_max_ms must be a number"):
        server.reconfigure({"stream_interval_max_ms": "fast"})
