"""The gateway's request pipeline: one ``RequestLifecycle`` owns each request from admission to settlement.

Used by the HTTP surface (``deployments.http_api``), which authenticates and parses, then hands the
request here; built by the Serve deployment (``deployments.gateway``) or, in tests, directly with a mock
``Backends``. A request's life:

    before_inference  authorise the model, estimate, reserve limits and quota (one store round trip)
    open              choose a backend by effective weight, open it, wait for its first item; one retry
                      elsewhere if the backend (not the client) failed before the first byte
    relay             forward a stream's chunks, metering them
    on_inference_complete(outcome, status, usage)
                      exactly once, whatever happened (answer, client error, backend failure, client gone,
                      cancellation): settle (one more round trip, retried until it lands), record metrics

A ``Reply`` is what the HTTP surface sends: a whole JSON body, or a stream whose ``close`` ends the
request if the client left before the stream was read to its end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from arks_ray.api.digests import TokenKeys
from arks_ray.api.gateway import Backend, Endpoint, GatewayConfig, Grant, Token
from arks_ray.engines.protocol import (
    DONE,
    Answer,
    Chunk,
    EngineItem,
    EngineRequest,
    EngineStream,
    Failure,
    Final,
    wants_usage,
)
from arks_ray.errors import QuotaExceeded, RateLimited, RequestError, to_openai_error
from arks_ray.gateway.governor import Admission, Governor
from arks_ray.gateway.health import BreakerSettings
from arks_ray.gateway.index import GatewayIndex
from arks_ray.gateway.limits import Usage, cost_micro, estimate_usage, usage_from
from arks_ray.gateway.ports import CounterStore
from arks_ray.gateway.records import Outcome, RequestRecord, client_request_id
from arks_ray.gateway.routing import Router, RouteView, Ticket
from arks_ray.gateway.settings import GatewaySettings
from arks_ray.gateway.settlement import Settlements
from arks_ray.gateway.signals import SloSettings
from arks_ray.stores.memory import MemoryStore
from deployments.backends import Backends
from deployments.gateway_metrics import Metrics, NoMetrics

logger = logging.getLogger("ray.serve.arks.gateway")

SETTLE_WAIT_S = 0.1
"""How long an answer's last bytes wait for its settlement's first try (one store round trip), so that a
client's next request is admitted against this one's real usage; a slower store is not waited for."""


@dataclass
class Reply:
    """What to send: ``body`` (a whole answer) or ``stream`` (SSE text), with status and headers."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    stream: AsyncIterator[str] | None = None
    close: Callable[[], None] = lambda: None
    """Ends the request if the stream was not read to its end (idempotent)."""


def error_reply(err: RequestError) -> Reply:
    status, body, headers = to_openai_error(err)
    return Reply(status, headers, body)


class Pipeline:
    """The request path of one gateway replica, independent of Serve and HTTP."""

    def __init__(self, settings: GatewaySettings, backends: Backends, *, store: CounterStore | None = None,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 keys: TokenKeys | None = None) -> None:
        self.settings = settings
        self.keys = keys
        """Token digest keys; None: from the environment (``arks_ray.api.digests.TOKEN_KEY_ENV``)."""
        self.backends = backends
        self.clock = clock
        self.metrics: Metrics = metrics or NoMetrics()
        self.store: CounterStore = store or MemoryStore()
        self.governor = Governor(
            self.store, policy=settings.failure_policy, algorithm=settings.rate_limit_algorithm,
            default_max_tokens=settings.default_max_tokens, lease_ms=settings.lease_seconds * 1000,
            on_store_failure=self.metrics.store_failure,
            settlements=Settlements(self.store, max_pending=settings.max_pending_settlements,
                                    on_failure=self.metrics.store_failure))
        self.router = Router(
            BreakerSettings(failure_threshold=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_s,
                            max_cooldown_s=settings.breaker_max_cooldown_s),
            SloSettings(tolerance=settings.slo_tolerance, max_change_per_s=settings.slo_max_change_per_s,
                        queue_target=settings.slo_queue_target))
        self.index = GatewayIndex(GatewayConfig(), keys)
        self.rng = random.Random(settings.seed)  # noqa: S311 - load spreading, not security
        self._settling: set[asyncio.Task[None]] = set()

    def reconfigure(self, user_config: dict[str, Any]) -> GatewayConfig:
        """Swap in a new ``GatewayConfig``; an invalid one is refused and the previous one kept."""
        try:
            config = GatewayConfig.model_validate(user_config)
        except ValidationError as exc:
            logger.error("gateway config refused, keeping the previous one: %s", exc)
            raise
        self.index = GatewayIndex(config, self.keys)
        self.router.retain(config.endpoints)
        logger.info("gateway config applied: %d endpoints, %d tokens, %d quotas",
                    len(config.endpoints), len(config.tokens), len(config.quotas))
        return config

    def lifecycle(self, kind: str, token: Token, body: dict[str, Any], headers: Mapping[str, str],
                  started: float | None = None) -> RequestLifecycle:
        return RequestLifecycle(self, self.index, kind, token, body, headers,
                                self.clock() if started is None else started)

    async def serve(self, kind: str, token: Token, body: dict[str, Any], headers: Mapping[str, str],
                    started: float | None = None) -> Reply:
        """One authenticated, parsed request, answered."""
        life = self.lifecycle(kind, token, body, headers, started)
        try:
            await life.before_inference()
            reply = await life.open()
        except RequestError as err:
            life.on_inference_complete(_outcome_of(err), err.status, reason=err.reason)
            if err.status == 503 and "Retry-After" not in err.headers:
                err.headers["Retry-After"] = self.retry_after()
            await life.settled()
            return error_reply(err)
        except BaseException:
            life.on_inference_complete("client_gone", 499)
            raise
        if reply.stream is None:
            await life.settled()  # a stream settles before its last event instead (relay)
        return reply

    def refused(self, kind: str, token: Token | None, err: RequestError, started: float,
                headers: Mapping[str, str] | None = None) -> None:
        """Record a request refused before its lifecycle began (a bad token, a bad body): nothing to settle."""
        now = self.clock()
        self.metrics.finished(RequestRecord(
            request_id=uuid.uuid4().hex, namespace=self.index.config.namespace, token=token.name if token else "",
            endpoint="", backend="", kind=kind, stream=False, status=err.status, outcome=_outcome_of(err),
            prompt_tokens=0, completion_tokens=0, cost=0.0, started=started, ttft_s=None, duration_s=now - started,
            gateway_s=now - started, limit=err.reason, client_request_id=client_request_id(headers or {})))

    def settle(self, admission: Admission | None, usage: Usage) -> asyncio.Task[None] | None:
        """Settle in the background: it must run even when the request's task is being cancelled. The task
        ends after the first try (a settlement the store cannot take then is queued and retried)."""
        if admission is None or not admission.counted:
            return None
        task = asyncio.get_running_loop().create_task(self.governor.settle(admission, usage))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    def retry_after(self) -> str:
        """When to retry a request no backend could take: after the next health check has looked again."""
        return str(max(1, math.ceil(self.settings.health_check_interval_s or 1)))

    def backend_header(self, backend: Backend | None) -> dict[str, str]:
        return {"x-arks-backend": backend.name} if backend is not None and self.settings.backend_header else {}

    def routes(self) -> list[RouteView]:
        return self.router.snapshot(self.index.config.endpoints, self.clock())

    async def renew_leases(self) -> int:
        return await self.governor.renew(self.clock())

    async def drain(self) -> None:
        """Wait for pending settlements, retried ones included (tests, shutdown)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)
        await self.governor.settlements.drain()

    async def close(self) -> None:
        await self.governor.settlements.close()


def _outcome_of(err: RequestError) -> Outcome:
    if isinstance(err, QuotaExceeded):
        return "quota"
    if isinstance(err, RateLimited):
        return "limited"
    if err.status in (401, 403):
        return "unauthorized"
    if err.status >= 500:
        return "unavailable"
    return "client_error"


class RequestLifecycle:
    """One request, from admission to settlement. Settles and records exactly once."""

    def __init__(self, pipeline: Pipeline, index: GatewayIndex, kind: str, token: Token, body: dict[str, Any],
                 headers: Mapping[str, str], started: float) -> None:
        self.p = pipeline
        self.index = index  # one config for the whole request, even if a reconfigure lands meanwhile
        self.kind, self.token, self.body, self.headers = kind, token, body, headers
        self.started = started
        self.stream = body.get("stream") is True and kind != "embeddings"
        self.endpoint: Endpoint | None = None
        self.grant: Grant | None = None
        self.admission: Admission | None = None
        self.backend: Backend | None = None
        self.retries = 0
        self.asked_at: float | None = None
        self.first_at: float | None = None
        self._done = False
        self._settling: asyncio.Task[None] | None = None

    # --- before_inference ---------------------------------------------------------------------------

    async def before_inference(self) -> None:
        """Authorise the model and reserve its limits and quota (429 when they refuse)."""
        self.endpoint, self.grant = self.index.authorize(self.token, self.body["model"])
        quota = self.index.quota(self.grant.quota) if self.grant.quota else None
        self.admission = await self.p.governor.admit(
            config=self.index.config, token=self.token, grant=self.grant, quota=quota,
            pricing=self.endpoint.pricing,
            estimate=estimate_usage(self.kind, self.body, self.p.settings.default_max_tokens),
            now=self.p.clock())

    # --- open: route, open, first item --------------------------------------------------------------

    async def open(self) -> Reply:
        """A backend's answer, or its stream once its first chunk is in; one retry before the first byte."""
        assert self.endpoint is not None
        assert self.admission is not None
        p, endpoint = self.p, self.endpoint
        tried: list[str] = []
        self.asked_at = p.clock()
        while True:
            backend = p.router.choose(endpoint, p.rng, p.clock(), exclude=tried)
            self.backend = backend
            ticket = p.router.start(endpoint.name, backend.name, p.clock(), self.stream)
            session = self.headers.get(backend.session_header) if backend.session_header else None
            request = EngineRequest(self.kind, self.body, wants_usage(self.body), session)
            engine = p.backends.open(backend, request)
            items = aiter(engine)
            try:
                first = await self._first(engine, items)
            except BaseException:
                engine.cancel()  # the client left before the first byte: stop the engine too
                p.router.released(ticket, p.clock())
                raise
            self.first_at = p.clock()
            if isinstance(first, Failure) and first.blames_backend:
                p.router.failed(ticket, p.clock(), first.message)
                p.backends.forget(backend)
                tried.append(backend.name)
                if self._can_retry(tried):
                    logger.warning("backend %s of %s failed before its first byte (%s); retrying on another",
                                   backend.name, endpoint.name, first.message)
                    self.retries += 1
                    p.metrics.retried(endpoint.name, backend.name)
                    continue
                return self._failed(first)
            if isinstance(first, Chunk):
                if not self.stream:
                    engine.cancel()
                    p.router.failed(ticket, p.clock(), "it answered a non-streaming request with a stream")
                    return self._failed(Failure("engine", 502, f"backend {backend.name!r} answered out of protocol"))
                p.router.first_byte(ticket, self.first_at)  # TTFT, and the start of TPOT, for SLO routing
                return self._streaming(first, items, engine, ticket)
            return self._whole(first, ticket)

    async def _first(self, engine: EngineStream, items: AsyncIterator[EngineItem]) -> EngineItem:
        timeout = self.p.settings.first_byte_timeout_s
        try:
            return await asyncio.wait_for(anext(items), timeout)
        except StopAsyncIteration:
            return Failure("engine", 502, "the backend returned nothing")
        except TimeoutError:
            engine.cancel()
            return Failure("timeout", 504, f"the backend sent nothing within {timeout:g}s")

    def _can_retry(self, tried: list[str]) -> bool:
        assert self.endpoint is not None
        if not self.p.settings.retry_before_first_byte or len(tried) > 1:
            return False
        return any(b.weight > 0 and b.name not in tried for b in self.endpoint.backends)

    def _failed(self, failure: Failure) -> Reply:
        """The backend failed and no retry is left: the failure, with Retry-After when it is transient."""
        headers = self._headers()
        if failure.kind in ("unavailable", "timeout"):
            headers["Retry-After"] = self.p.retry_after()
        self.on_inference_complete("backend_error", failure.status)
        return Reply(failure.status, headers, failure.body())

    def _whole(self, item: Answer | Failure | Final, ticket: Ticket) -> Reply:
        p = self.p
        if isinstance(item, Answer):
            assert self.admission is not None
            est = self.admission.estimate
            used = usage_from(item.body.get("usage"), est.prompt_tokens, est.completion_tokens)
            p.router.succeeded(ticket, p.clock(), used.completion_tokens)
            self.on_inference_complete("ok", item.status, used)
            return Reply(item.status, self._headers(), item.body)
        p.router.released(ticket, p.clock())
        if isinstance(item, Failure):  # the client's mistake: no breaker, no retry
            self.on_inference_complete("client_error", item.status)
            return Reply(item.status, self._headers(), item.body())
        self.on_inference_complete("backend_error", 502)
        return Reply(502, self._headers(), Failure("engine", 502, "the backend answered out of protocol").body())

    def _headers(self) -> dict[str, str]:
        assert self.admission is not None
        return {**self.admission.headers, **self.p.backend_header(self.backend)}

    # --- relay ----------------------------------------------------------------------------------------

    def _streaming(self, first: Chunk, items: AsyncIterator[EngineItem], engine: EngineStream,
                   ticket: Ticket) -> Reply:
        relay = self.relay(first, items, engine, ticket)

        def close() -> None:
            if not self._done:
                engine.cancel()
                self.p.router.released(ticket, self.p.clock())
                self.on_inference_complete("client_gone", 499, self._counted(None, first.counted()))

        headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **self._headers()}
        return Reply(200, headers, stream=relay, close=close)

    async def relay(self, first: Chunk, items: AsyncIterator[EngineItem], engine: EngineStream,
                    ticket: Ticket) -> AsyncIterator[str]:
        """The stream's text; settles when it ends, however it ends. The chunk that ends the stream (with
        ``[DONE]``) is held until the settlement's first try, so a client that sends its next request on
        ``[DONE]`` is admitted against this one's real usage."""
        p = self.p
        final: Final | None = None
        relayed = first.counted()  # output tokens relayed, as the engine counted them (Chunk.counted)
        outcome: Outcome | None = None  # None until it ends: the client left
        status = 200
        last = ""  # the chunk with [DONE], held back
        try:
            if DONE in first.text:
                last = first.text
            else:
                yield first.text
            async for item in items:
                if isinstance(item, Chunk):
                    relayed += item.counted()
                    if last:  # more after [DONE]: let the held chunk go first
                        yield last
                        last = ""
                    if DONE in item.text:
                        last = item.text
                    else:
                        yield item.text
                elif isinstance(item, Final):
                    final = item
                elif isinstance(item, Failure):
                    outcome = "backend_error" if item.blames_backend else "client_error"
                    status = item.status
                    # Headers are gone: report in-band, as vLLM does, then end the stream properly.
                    yield last + _event(item.body()) + DONE
                    last = ""
                    if item.blames_backend:
                        p.router.failed(ticket, p.clock(), item.message)
                    else:
                        p.router.released(ticket, p.clock())
                    return
            outcome = "ok"
        finally:
            if outcome is None:
                engine.cancel()  # the client left: stop the engine's work
                p.router.released(ticket, p.clock())
            used = self._counted(final, relayed)
            if outcome == "ok":
                p.router.succeeded(ticket, p.clock(), used.completion_tokens)
            self.on_inference_complete(outcome or "client_gone", status if outcome else 499, used)
        if last:
            await self.settled()
            yield last

    async def settled(self) -> None:
        """Wait for the settlement's first try, at most ``SETTLE_WAIT_S``: the answer is not held longer for
        a slow store (the settlement then lands in the background, as it would anyway)."""
        if self._settling is not None and not self._settling.done():
            await asyncio.wait({self._settling}, timeout=SETTLE_WAIT_S)

    def _counted(self, final: Final | None, relayed: int) -> Usage:
        """Usage of a stream: the engine's own when it sent it, else the output tokens relayed (each chunk's
        ``counted``: its events, or the engine's count when vLLM hands over several tokens per event) with the
        prompt estimate."""
        assert self.admission is not None
        counted = final.completion_tokens if final else relayed
        return usage_from(final.usage if final else None, self.admission.estimate.prompt_tokens, counted)

    # --- on_inference_complete --------------------------------------------------------------------------

    def on_inference_complete(self, outcome: Outcome, status: int, usage: Usage | None = None,
                              reason: str = "") -> None:
        """Settle and record, exactly once: later calls (a close after the relay ended) do nothing."""
        if self._done:
            return
        self._done = True
        used = usage or Usage(0, 0)
        self._settling = self.p.settle(self.admission, used)
        now = self.p.clock()
        pricing = self.endpoint.pricing if self.endpoint else None
        self.p.metrics.finished(RequestRecord(
            request_id=self.admission.request_id if self.admission else "",
            namespace=self.index.config.namespace, token=self.token.name,
            endpoint=self.endpoint.name if self.endpoint else "", backend=self.backend.name if self.backend else "",
            kind=self.kind, stream=self.stream, status=status, outcome=outcome,
            prompt_tokens=used.prompt_tokens, completion_tokens=used.completion_tokens,
            cost=cost_micro(pricing, used.prompt_tokens, used.completion_tokens) / 1e6,
            started=self.started, ttft_s=(self.first_at - self.started) if self.first_at else None,
            duration_s=now - self.started,
            gateway_s=(self.asked_at or now) - self.started, retries=self.retries, limit=reason,
            client_request_id=client_request_id(self.headers)))


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
