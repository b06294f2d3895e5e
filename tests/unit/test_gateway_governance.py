"""Rate limits and quotas through the gateway's real HTTP surface (``Pipeline`` + ``make_api``), over the
mock engine port, a ``MemoryStore`` and an injected clock: 429s and their headers, refunds of short answers
(plain and streamed), settlement of disconnected and failed requests (exactly once, and even when the store
was down at the time), concurrency, and store failure policies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from arks_ray.api.gateway import Backend, Endpoint, Limit, Quota, QuotaBudget
from arks_ray.engines.protocol import DONE, Answer, Chunk, EngineItem, EngineRequest, Failure, Final
from arks_ray.gateway.limits import Counter, Usage
from arks_ray.gateway.ports import Decision, StoreUnavailable
from arks_ray.gateway.quotas import QuotaLedger
from arks_ray.gateway.records import RequestRecord
from arks_ray.stores.memory import MemoryStore
from deployments.gateway_metrics import NoMetrics
from deployments.http_api import make_api
from tests.support.mock_engine import MockBackends, Script, pipeline, token

NOW = 1_700_000_040.0
"""A UTC minute boundary."""
AUTH = {"Authorization": "Bearer sk-alice"}
CHUNK = 'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
# "hello world!": 12 characters = 3 tokens, + 4 per message: 7 prompt tokens; + max_tokens 50 = 57 reserved.
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello world!"}], "max_tokens": 50}
ESTIMATE = 57


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Backends(MockBackends):
    """The mock engine, answering with a given usage; may hold every request until released."""

    def __init__(self) -> None:
        super().__init__()
        self.answer(7, 50)
        self.hold = False
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def answer(self, prompt_tokens: int, completion_tokens: int) -> None:
        """From now on, a whole (non-streaming) response with this usage."""
        self.script(Answer({"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}))

    def script(self, *items: EngineItem, hang: bool = False) -> None:
        self.scripts["app-m"] = Script(items=list(items), hang=hang)

    async def _items(self, script: Script, request: EngineRequest) -> AsyncIterator[EngineItem]:
        self.started.set()
        if self.hold:
            await self.release.wait()
        async for item in super()._items(script, request):
            yield item


class Metrics(NoMetrics):
    """Records what the gateway reports."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.failures: list[str] = []

    def finished(self, record: RequestRecord) -> None:
        self.records.append(record)

    def store_failure(self, operation: str) -> None:
        self.failures.append(operation)

    @property
    def refusals(self) -> list[tuple[str, str, str]]:
        return [(r.endpoint, r.outcome, r.limit) for r in self.records if r.status == 429]


class DeadStore(MemoryStore):
    async def reserve(self, counters: Sequence[Counter], request_id: str, now_ms: int) -> Decision:
        raise StoreUnavailable("ConnectionError: connection refused")


class SettleFailsOnce(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        if not self.failed:
            self.failed += 1
            raise StoreUnavailable("TimeoutError")
        await super().settle(counters, request_id, reserved_at_ms, amounts)


class Setup:
    """One gateway with one endpoint ``m`` and one token ``alice``, and an async client on its ASGI app."""

    def __init__(self, limits: dict[str, int], quota: Quota | None = None, *, store: MemoryStore | None = None,
                 policy: str = "failOpen") -> None:
        self.clock = Clock()
        self.backends = Backends()
        self.metrics = Metrics()
        self.store = store or MemoryStore()
        self.quotas = (quota,) if quota else ()
        alice = token("alice", "sk-alice", "m", quota=quota.name if quota else None,
                      limits=tuple(Limit(type=t, value=v) for t, v in limits.items()))
        self.pipeline = pipeline(
            self.backends, (alice,), settings={"failure_policy": policy}, store=self.store, metrics=self.metrics,
            clock=self.clock, namespace="ns", quotas=self.quotas,
            endpoints=(Endpoint(name="m", backends=(Backend(kind="app", name="app-m", weight=1),)),))
        self.app = make_api(self.pipeline)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gateway")

    async def post(self, body: dict[str, Any] | None = None, path: str = "/v1/chat/completions") -> httpx.Response:
        """One request, then its settlement (which runs in the background) is awaited."""
        resp = await self.client.post(path, json=body or BODY, headers=AUTH)
        await self.pipeline.drain()
        return resp

    async def usage(self) -> dict[str, dict[str, int]]:
        return await QuotaLedger(self.store).usage("ns", self.quotas, self.clock())


@pytest.fixture
async def make() -> AsyncIterator[Any]:
    made: list[Setup] = []

    def factory(*args: Any, **kw: Any) -> Setup:
        made.append(Setup(*args, **kw))
        return made[-1]

    yield factory
    for s in made:
        await s.client.aclose()


def assert_error(resp: httpx.Response, status: int, type_: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == type_
    if status == 429:
        assert error["code"] == type_


# --- rate limits --------------------------------------------------------------------------------------------


async def test_rpm_2_refuses_the_third_request_with_retry_after(make: Any) -> None:
    s = make({"rpm": 2})
    first, second = await s.post(), await s.post()
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert (first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]) == (
        "1", "0")
    assert first.headers["x-ratelimit-reset-requests"] == "1m1s"
    assert "x-ratelimit-limit-tokens" not in first.headers

    s.clock.now = NOW + 20.2
    third = await s.post()
    assert_error(third, 429, "rate_limit_exceeded")
    assert third.headers["Retry-After"] == "41"
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert s.metrics.refusals == [("m", "limited", "rpm")]
    assert len(s.backends.requests) == 2  # the refused request never reached a backend

    s.clock.now = NOW + 61
    assert (await s.post()).status_code == 200


async def test_token_headers_when_tpm_is_set(make: Any) -> None:
    s = make({"rpm": 10, "tpm": 1000})
    resp = await s.post()
    assert resp.headers["x-ratelimit-limit-tokens"] == "1000"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - ESTIMATE)
    assert resp.headers["x-ratelimit-reset-tokens"] == "1m1s"
    assert resp.headers["x-ratelimit-remaining-requests"] == "9"


async def test_a_short_answer_is_refunded_in_the_next_remaining(make: Any) -> None:
    s = make({"tpm": 1000})
    s.backends.answer(7, 5)
    assert (await s.post()).headers["x-ratelimit-remaining-tokens"] == str(1000 - ESTIMATE)
    assert (await s.post()).headers["x-ratelimit-remaining-tokens"] == str(1000 - 12 - ESTIMATE)


async def test_a_short_stream_is_refunded_from_its_final_usage(make: Any) -> None:
    s = make({"tpm": 1000})
    s.backends.script(Chunk(CHUNK), Chunk(CHUNK), Chunk(DONE),
                      Final({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, 2))
    resp = await s.post({**BODY, "stream": True})
    assert resp.status_code == 200
    assert resp.text == CHUNK + CHUNK + DONE
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - ESTIMATE)
    s.backends.answer(7, 50)
    assert (await s.post()).headers["x-ratelimit-remaining-tokens"] == str(1000 - 10 - ESTIMATE)


async def test_a_long_answer_is_charged_in_full(make: Any) -> None:
    s = make({"tpm": 1000})
    s.backends.answer(7, 400)
    await s.post()
    assert (await s.post()).headers["x-ratelimit-remaining-tokens"] == str(1000 - 407 - ESTIMATE)


# --- quotas -------------------------------------------------------------------------------------------------


async def test_an_exhausted_quota_is_429_insufficient_quota(make: Any) -> None:
    s = make({}, Quota(name="team", budgets=(QuotaBudget(type="total", value=100),)))
    assert (await s.post()).status_code == 200
    assert await s.usage() == {"team": {"total": 57}}
    resp = await s.post()
    assert_error(resp, 429, "insufficient_quota")
    assert "Retry-After" not in resp.headers  # a lifetime quota never comes back by itself
    assert s.metrics.refusals == [("m", "quota", "quota")]


async def test_a_daily_quota_says_when_it_comes_back(make: Any) -> None:
    s = make({}, Quota(name="team", period="daily", budgets=(QuotaBudget(type="prompt", value=10),)))
    assert (await s.post()).status_code == 200
    resp = await s.post()
    assert_error(resp, 429, "insufficient_quota")
    assert resp.headers["Retry-After"] == str(1_700_006_400 - int(NOW))  # 2023-11-15T00:00:00Z
    s.clock.now = 1_700_006_400.0
    assert (await s.post()).status_code == 200


# --- settlement of what went wrong --------------------------------------------------------------------------


async def asgi_stream_until_disconnect(app: Any, body: dict[str, Any], chunks: int = 1) -> list[dict[str, Any]]:
    """Drive the ASGI app like a server whose client hangs up after the first ``chunks`` streamed chunks.

    (The test clients buffer whole responses, so closing one early never reaches the app.)"""
    sent: list[dict[str, Any]] = []
    got_chunk = asyncio.Event()
    bodies = 0
    request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if request:
            return request.pop()
        await got_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal bodies
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            bodies += 1
            if bodies >= chunks:
                got_chunk.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 5000), "server": ("gateway", 80),
        "headers": [(b"authorization", AUTH["Authorization"].encode()), (b"content-type", b"application/json")],
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


async def test_a_stream_cut_by_the_client_is_settled_with_what_was_relayed(make: Any) -> None:
    s = make({"tpm": 1000, "concurrency": 1}, Quota(name="team", budgets=(QuotaBudget(type="total", value=10**6),)))
    s.backends.script(Chunk(CHUNK), Chunk(CHUNK), Chunk(CHUNK), Chunk(DONE), hang=True)
    sent = await asgi_stream_until_disconnect(s.app, {**BODY, "stream": True})
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == CHUNK.encode()
    await s.pipeline.drain()

    relayed = Usage(prompt_tokens=7, completion_tokens=1)  # the estimate's prompt, and one event relayed
    assert await s.usage() == {"team": {"total": relayed.total_tokens}}
    assert s.backends.cancelled == ["app-m"]  # the engine was told to stop
    assert [(r.outcome, r.status, r.completion_tokens) for r in s.metrics.records] == [("client_gone", 499, 1)]
    s.backends.answer(7, 50)
    resp = await s.post()  # the lease was released: concurrency 1 admits again
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - relayed.total_tokens - ESTIMATE)


async def test_a_cut_stream_whose_events_carry_several_tokens_is_charged_the_engines_count(make: Any) -> None:
    # vLLM handing over 8 tokens per event (the stride): the engine counts them on each chunk, and a client that
    # leaves early is charged those, not one per event.
    s = make({"tpm": 1000}, Quota(name="team", budgets=(QuotaBudget(type="total", value=10**6),)))
    # The client leaves after two chunks, while the engine takes its time over the third.
    s.backends.scripts["app-m"] = Script(items=[Chunk(CHUNK, 1), Chunk(CHUNK, 8), Chunk(CHUNK, 8)], gap_s=0.5)
    sent = await asgi_stream_until_disconnect(s.app, {**BODY, "stream": True}, chunks=2)
    assert [m.get("body") for m in sent[1:]] == [CHUNK.encode(), CHUNK.encode()]
    await s.pipeline.drain()
    assert await s.usage() == {"team": {"total": 7 + 1 + 8}}
    assert [(r.outcome, r.completion_tokens) for r in s.metrics.records] == [("client_gone", 9)]


async def test_a_backend_failure_counts_the_request_but_no_tokens(make: Any) -> None:
    s = make({"rpm": 10, "tpm": 1000}, Quota(name="team", budgets=(QuotaBudget(type="total", value=10**6),)))
    s.backends.script(Failure("unavailable", 503, "backend 'app-m' lost the replica serving this request"))
    failed = await s.post()
    assert_error(failed, 503, "server_error")
    assert await s.usage() == {"team": {"total": 0}}
    s.backends.answer(7, 50)
    resp = await s.post()
    assert resp.headers["x-ratelimit-remaining-requests"] == "8"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - ESTIMATE)


async def test_an_engine_error_counts_the_request_but_no_tokens(make: Any) -> None:
    s = make({"rpm": 10, "tpm": 1000})
    s.backends.script(Failure("invalid", 400, "max_tokens is too large", param="max_tokens"))
    assert_error(await s.post(), 400, "invalid_request_error")
    assert [r.outcome for r in s.metrics.records] == ["client_error"]
    s.backends.answer(7, 50)
    resp = await s.post()
    assert resp.headers["x-ratelimit-remaining-requests"] == "8"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - ESTIMATE)


# --- concurrency --------------------------------------------------------------------------------------------


async def test_concurrency_1_refuses_a_second_request_in_flight(make: Any) -> None:
    s = make({"concurrency": 1})
    s.backends.hold = True
    first = asyncio.create_task(s.client.post("/v1/chat/completions", json=BODY, headers=AUTH))
    await asyncio.wait_for(s.backends.started.wait(), timeout=5)
    second = await s.client.post("/v1/chat/completions", json=BODY, headers=AUTH)
    assert_error(second, 429, "rate_limit_exceeded")
    assert second.headers["Retry-After"] == "1"
    s.backends.release.set()
    assert (await asyncio.wait_for(first, timeout=5)).status_code == 200
    await s.pipeline.drain()
    assert (await s.post()).status_code == 200


async def test_a_request_cancelled_before_its_first_token_frees_its_slot(make: Any) -> None:
    """What Serve does when the client leaves while the engine is still queueing or prefilling."""
    s = make({"rpm": 10, "tpm": 1000, "concurrency": 1})
    s.backends.hold = True
    waiting = asyncio.create_task(s.client.post("/v1/chat/completions", json=BODY, headers=AUTH))
    await asyncio.wait_for(s.backends.started.wait(), timeout=5)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await s.pipeline.drain()
    assert s.backends.cancelled == ["app-m"]
    assert [(r.outcome, r.status) for r in s.metrics.records] == [("client_gone", 499)]
    s.backends.release.set()
    resp = await s.post()
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-remaining-requests"] == "8"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - ESTIMATE)


# --- store failures -----------------------------------------------------------------------------------------


async def test_a_dead_store_under_fail_open_lets_requests_through_uncounted(make: Any) -> None:
    s = make({"rpm": 1}, store=DeadStore())
    for _ in range(3):
        resp = await s.post()
        assert resp.status_code == 200
        assert "x-ratelimit-limit-requests" not in resp.headers
    assert s.metrics.failures == ["reserve"] * 3


async def test_a_dead_store_under_fail_closed_is_503_with_retry_after(make: Any) -> None:
    s = make({"rpm": 1}, store=DeadStore(), policy="failClosed")
    resp = await s.post()
    assert_error(resp, 503, "server_error")
    assert resp.headers["Retry-After"] == "1"
    assert s.metrics.failures == ["reserve"]


async def test_a_settlement_the_store_missed_lands_when_it_answers_again(make: Any) -> None:
    store = SettleFailsOnce()
    s = make({"tpm": 1000, "concurrency": 1}, Quota(name="team", budgets=(QuotaBudget(type="total", value=10**6),)),
             store=store)
    s.backends.answer(7, 5)
    assert (await s.post()).status_code == 200  # drain waits for the retried settlement
    assert store.failed == 1
    assert s.metrics.failures == ["settle"]
    assert await s.usage() == {"team": {"total": 12}}  # charged once, what was used
    resp = await s.post()  # the lease was released by the late settlement
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - 12 - ESTIMATE)


async def test_every_request_is_recorded_exactly_once(make: Any) -> None:
    s = make({"rpm": 3})
    await s.post()
    s.backends.script(Chunk(CHUNK), Chunk(DONE), Final({"prompt_tokens": 7, "completion_tokens": 1}, 1))
    await s.post({**BODY, "stream": True})
    s.backends.script(Failure("engine", 502, "backend 'app-m' failed"))
    await s.post()
    await s.post()
    assert [(r.outcome, r.status) for r in s.metrics.records] == [
        ("ok", 200), ("ok", 200), ("backend_error", 502), ("limited", 429)]
    assert [r.completion_tokens for r in s.metrics.records[:2]] == [50, 1]


# --- settlement before the answer's last bytes ---------------------------------------------------------------


class SlowSettle(MemoryStore):
    """A store whose settlement takes ``delay_s``; records when each one landed."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.landed: list[str] = []

    async def settle(self, counters: Sequence[Counter], request_id: str, reserved_at_ms: int,
                     amounts: Sequence[int]) -> None:
        await asyncio.sleep(self.delay_s)
        await super().settle(counters, request_id, reserved_at_ms, amounts)
        self.landed.append(request_id)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_next_request_of_a_sequential_client_sees_the_last_ones_real_usage(make: Any,
                                                                                   stream: bool) -> None:
    store = SlowSettle(0.02)  # a store round trip, well under the wait (SETTLE_WAIT_S)
    s = make({"tpm": 1000}, store=store)
    if stream:
        s.backends.script(Chunk(CHUNK), Chunk(CHUNK + DONE),
                          Final({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, 2))
    else:
        s.backends.answer(7, 3)
    first = await s.client.post("/v1/chat/completions", json={**BODY, "stream": stream}, headers=AUTH)
    assert first.status_code == 200
    if stream:
        assert first.text == CHUNK + CHUNK + DONE  # the held-back last chunk is sent, whole and in order
    assert len(store.landed) == 1  # landed before the client had the whole answer, without a drain
    s.backends.answer(7, 50)
    second = await s.client.post("/v1/chat/completions", json=BODY, headers=AUTH)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 10 - ESTIMATE)


async def test_a_slow_store_does_not_hold_the_answer_and_its_settlement_still_lands(make: Any) -> None:
    from deployments.pipeline import SETTLE_WAIT_S

    store = SlowSettle(2.0)
    s = make({"tpm": 1000}, store=store)
    s.backends.answer(7, 3)
    t0 = asyncio.get_running_loop().time()
    resp = await s.client.post("/v1/chat/completions", json=BODY, headers=AUTH)
    waited = asyncio.get_running_loop().time() - t0
    assert resp.status_code == 200
    assert SETTLE_WAIT_S <= waited < store.delay_s / 2  # waited for the settlement, not for a slow store
    assert store.landed == []
    await s.pipeline.drain()
    assert len(store.landed) == 1
