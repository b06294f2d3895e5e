"""The gateway ingress: OpenAI-compatible HTTP API with token auth, in front of every engine app.

``deployments.gateway:build_app`` is the import path of the rendered ``gateway`` application. The
``Gateway`` class is plain: Serve wraps it in ``build_app``; tests may construct it directly with fake
backends. Its per-tenant data arrives as the Serve ``user_config`` (``reconfigure``), so token and
endpoint edits apply to live replicas without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from arks_ray.api.gateway import GATEWAY_APP, Backend, Endpoint, GatewayConfig
from arks_ray.engines import protocol
from arks_ray.errors import BackendUnavailable, InvalidRequest, RequestError, RequestTooLarge, to_openai_error
from arks_ray.gateway.governor import Admission, Governor
from arks_ray.gateway.health import BreakerSettings
from arks_ray.gateway.index import GatewayIndex
from arks_ray.gateway.limits import Usage, estimate_usage, usage_from
from arks_ray.gateway.routing import Router, RouteView, Ticket
from arks_ray.gateway.settings import GatewaySettings
from arks_ray.gateway.signals import SloSettings
from arks_ray.stores.base import CounterStore
from arks_ray.stores.memory import MemoryStore
from deployments.backends import Backends
from deployments.gateway_metrics import Metrics, NoMetrics

logger = logging.getLogger("ray.serve.arks.gateway")

DEPLOYMENT_NAME = "ArksGateway"


class Prober(Protocol):
    """Active health checks (``deployments.backends.RoutedBackends``)."""

    async def probe_apps(self) -> dict[str, tuple[bool, str]]: ...
    async def probe_http(self, backend: Backend) -> tuple[bool, str]: ...


def error_response(err: RequestError) -> JSONResponse:
    status, body, headers = to_openai_error(err)
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object; 413 past ``limit`` bytes, 400 if not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    return body


class _Failed(Exception):
    """A backend failed one request before its first byte: retry elsewhere, or answer with ``answer``."""

    def __init__(self, reason: str, answer: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


class Gateway:
    """The ingress logic, independent of Serve."""

    def __init__(self, settings: GatewaySettings, backends: Backends, *, store: CounterStore | None = None,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.backends = backends
        self.clock = clock
        self.metrics: Metrics = metrics or NoMetrics()
        self.governor = Governor(
            store or MemoryStore(), policy=settings.failure_policy, algorithm=settings.rate_limit_algorithm,
            default_max_tokens=settings.default_max_tokens, lease_ms=settings.lease_seconds * 1000,
            on_store_failure=self.metrics.store_failure)
        self.router = Router(
            BreakerSettings(failure_threshold=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_s,
                            max_cooldown_s=settings.breaker_max_cooldown_s),
            SloSettings(tolerance=settings.slo_tolerance, max_change_per_s=settings.slo_max_change_per_s,
                        queue_target=settings.slo_queue_target))
        self.index = GatewayIndex(GatewayConfig())
        self.rng = random.Random(settings.seed)  # noqa: S311 - load spreading, not security
        self._settling: set[asyncio.Task[None]] = set()

    def reconfigure(self, user_config: dict[str, Any]) -> GatewayConfig:
        """Swap in a new ``GatewayConfig``; an invalid one is refused and the previous one kept."""
        try:
            config = GatewayConfig.model_validate(user_config)
        except ValidationError as exc:
            logger.error("gateway config refused, keeping the previous one: %s", exc)
            raise
        self.index = GatewayIndex(config)
        self.router.retain(config.endpoints)
        logger.info("gateway config applied: %d endpoints, %d tokens, %d quotas",
                    len(config.endpoints), len(config.tokens), len(config.quotas))
        return config

    async def restore_quota_usage(self) -> int:
        """Put usage that ArksQuota status recorded back into the store if the store lost it."""
        raised = await self.governor.restore_floors_until_done(self.index.config, self.clock)
        if raised:
            logger.warning("restored %d quota counter(s) from ArksQuota status", raised)
        return raised

    async def models(self, authorization: str | None) -> dict[str, Any]:
        token = self.index.authenticate(authorization, self.clock())
        owner = self.index.config.namespace
        return {"object": "list", "data": [
            {"id": e.name, "object": "model", "created": 0, "owned_by": owner} for e in self.index.models_for(token)
        ]}

    async def openai(self, kind: str, request: Request) -> Response:
        index = self.index  # one config for the whole request, even if a reconfigure lands meanwhile
        token = index.authenticate(request.headers.get("authorization"), self.clock())
        body = await read_json(request, self.settings.max_body_bytes)
        endpoint, grant = index.authorize(token, body["model"])
        model = endpoint.name
        try:
            admission = await self.governor.admit(
                config=index.config, token=token, grant=grant,
                quota=index.quota(grant.quota) if grant.quota else None, pricing=endpoint.pricing,
                estimate=estimate_usage(kind, body, self.settings.default_max_tokens), now=self.clock())
        except RequestError as exc:
            if exc.status == 429:
                self.metrics.limited(model, exc.type)
            raise
        try:
            return await self._forward(kind, body, endpoint, admission, request.headers)
        except BaseException:
            self._settle(admission, model, Usage(0, 0))
            raise

    async def _forward(self, kind: str, body: dict[str, Any], endpoint: Endpoint, admission: Admission,
                       headers: Mapping[str, str]) -> Response:
        """Open the request on a backend; one retry elsewhere if the first fails before its first byte."""
        stream = body.get("stream") is True and kind != "embeddings"
        tried: list[str] = []
        while True:
            backend = self.router.choose(endpoint, self.rng, self.clock(), exclude=tried)
            ticket = self.router.start(endpoint.name, backend.name, self.clock(), stream)
            try:
                return await self._attempt(kind, body, backend, ticket, endpoint, admission, headers, stream)
            except _Failed as failure:
                self.router.failed(ticket, self.clock(), failure.reason)
                if self.router.state(endpoint.name, backend.name).breaker.view(self.clock()) == "open":
                    logger.warning("backend %s of %s is out of rotation: %s", backend.name, endpoint.name,
                                   failure.reason)
                forget = getattr(self.backends, "forget", None)
                if forget is not None:
                    forget(backend)
                tried.append(backend.name)
                if self._can_retry(endpoint, tried):
                    logger.warning("backend %s failed before its first byte (%s); retrying on another backend",
                                   backend.name, failure.reason)
                    self.metrics.retried(endpoint.name, backend.name)
                    continue
                logger.warning("backend %s failed before its first byte: %s", backend.name, failure.reason)
                if failure.answer is not None:
                    return self._whole(failure.answer, endpoint, admission, backend, ticket=None)
                raise BackendUnavailable(f"backend {backend.name!r} failed: {failure.reason}") from None
            except BaseException:
                self.router.released(ticket, self.clock())
                raise

    def _can_retry(self, endpoint: Endpoint, tried: list[str]) -> bool:
        if not self.settings.retry_before_first_byte or len(tried) > 1:
            return False
        return any(b.weight > 0 and b.name not in tried for b in endpoint.backends)

    async def _attempt(self, kind: str, body: dict[str, Any], backend: Backend, ticket: Ticket, endpoint: Endpoint,
                       admission: Admission, headers: Mapping[str, str], stream: bool) -> Response:
        session = headers.get(backend.session_header) if backend.session_header else None
        gen: Any = None
        try:
            gen = self.backends.open(backend, kind, body, protocol.wants_usage(body), session)
            iterator = gen.__aiter__()
            first = await asyncio.wait_for(iterator.__anext__(), self.settings.first_byte_timeout_s)
        except asyncio.CancelledError:
            _cancel(gen)  # the client left before the first byte: stop the engine too
            raise
        except StopAsyncIteration:
            raise _Failed("it returned nothing") from None
        except TimeoutError:
            _cancel(gen)
            raise _Failed(f"no first byte within {self.settings.first_byte_timeout_s:g}s") from None
        except Exception as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}"[:300]) from None
        self.router.first_byte(ticket, self.clock())
        if isinstance(first, dict):
            # A whole response or an error is the engine's last item: nothing left to cancel.
            if int(first.get("status", 502)) >= 500:
                raise _Failed(_error_message(first), answer=first)
            return self._whole(first, endpoint, admission, backend, ticket)
        if not stream:
            _cancel(gen)
            raise _Failed("it answered a non-streaming request with a stream")
        out = {"cache-control": "no-cache", "x-accel-buffering": "no", **admission.headers,
               **self._backend_header(backend)}
        return StreamingResponse(self._relay(first, iterator, gen, admission, endpoint.name, ticket),
                                 media_type="text/event-stream", headers=out)

    def _backend_header(self, backend: Backend) -> dict[str, str]:
        return {"x-arks-backend": backend.name} if self.settings.backend_header else {}

    def _whole(self, item: dict[str, Any], endpoint: Endpoint, admission: Admission, backend: Backend,
               ticket: Ticket | None) -> JSONResponse:
        status = int(item.get("status", 502))
        payload = item.get("body", {})
        est = admission.estimate
        used = usage_from(payload.get("usage"), est.prompt_tokens, est.completion_tokens) if status < 400 \
            else Usage(0, 0)
        if ticket is not None:
            self.router.succeeded(ticket, self.clock(), used.completion_tokens)
        self._settle(admission, endpoint.name, used)
        self.metrics.request(endpoint.name, status)
        return JSONResponse(payload, status_code=status, headers={**admission.headers, **self._backend_header(backend)})

    async def _relay(self, first: str, iterator: AsyncIterator[Any], gen: Any, admission: Admission,
                     model: str, ticket: Ticket) -> AsyncIterator[str]:
        final: dict[str, Any] | None = None
        events = first.count("data: {")
        status = 200
        verdict: str | None = None  # "ok", or why the backend failed; None: the client left
        try:
            yield first
            async for item in iterator:
                if isinstance(item, str):
                    events += item.count("data: {")
                    yield item
                elif item.get("arks") == "usage":
                    final = item
                elif item.get("arks") == "error":
                    status = int(item.get("status", 500))
                    verdict = _error_message(item) if status >= 500 else "ok"
                    # Headers are gone: report in-band, as vLLM does, then end the stream properly.
                    yield f"data: {json.dumps(item.get('body', {}))}\n\n" + protocol.DONE
                    return
            verdict = "ok"
        except Exception as exc:
            status, verdict = 502, f"stream broke: {type(exc).__name__}: {exc}"[:300]
            logger.warning("backend %s: %s", ticket.backend, verdict)
            body = {"error": {"message": f"the backend failed mid-stream ({type(exc).__name__})",
                              "type": "server_error", "code": None, "param": None}}
            yield f"data: {json.dumps(body)}\n\n" + protocol.DONE
        finally:
            if verdict is None or verdict != "ok":
                _cancel(gen)  # the client left, or the stream failed: stop the engine's work
            # Disconnects and failures are charged what was generated: the engine's own count when it
            # finished, else the events relayed (the first carries only the role: a 1-token overcount).
            counted = int(final["completion_tokens"]) if final else events
            used = usage_from(final.get("usage") if final else None, admission.estimate.prompt_tokens, counted)
            now = self.clock()
            if verdict == "ok":
                self.router.succeeded(ticket, now, used.completion_tokens)
            elif verdict is None:
                self.router.released(ticket, now)
            else:
                self.router.failed(ticket, now, verdict)
            self._settle(admission, model, used)
            self.metrics.request(model, status)

    def _settle(self, admission: Admission, model: str, usage: Usage) -> None:
        """Settle in the background: it must run even when the request's task is being cancelled."""
        self.metrics.tokens(model, usage)
        if not admission.counted:
            return
        task = asyncio.get_running_loop().create_task(self.governor.settle(admission, usage))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def check_health(self, prober: Prober) -> None:
        """One round of active health checks over every backend of every endpoint."""
        endpoints = self.index.config.endpoints
        apps = [(e.name, b) for e in endpoints for b in e.backends if b.kind == "app"]
        https = [(e.name, b) for e in endpoints for b in e.backends if b.kind == "http"]
        app_status = await prober.probe_apps() if apps else {}
        results = await asyncio.gather(*(prober.probe_http(b) for _, b in https))
        now = self.clock()
        checked = [(name, b, *app_status.get(b.name, (False, "Serve app not found"))) for name, b in apps]
        checked += [(name, b, ok, why) for (name, b), (ok, why) in zip(https, results, strict=True)]
        for name, backend, ok, why in checked:
            breaker = self.router.state(name, backend.name).breaker
            before = breaker.view(now)
            self.router.health_check(name, backend.name, now, ok, why)
            after = breaker.view(now)
            if (before == "closed") != (after == "closed"):  # in or out of rotation, not every probe
                log = logger.info if after == "closed" else logger.warning
                log("backend %s of %s: %s -> %s after a health check%s", backend.name, name, before, after,
                    f" ({why})" if why and not ok else "")

    def routes(self) -> list[RouteView]:
        return self.router.snapshot(self.index.config.endpoints, self.clock())

    async def drain(self) -> None:
        """Wait for pending settlements (tests, shutdown)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)


def _error_message(item: dict[str, Any]) -> str:
    err = (item.get("body") or {}).get("error") or {}
    return f"HTTP {item.get('status')}: {err.get('message', 'error')}"[:300]


def _cancel(gen: Any) -> None:
    cancel = getattr(gen, "cancel", None)
    if cancel is not None:
        cancel()


def make_api(gateway: Gateway) -> FastAPI:
    """The HTTP surface of one ``Gateway``: used by the Serve replica and, directly, by tests."""
    api = FastAPI(title="arks-ray gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse(await gateway.models(request.headers.get("authorization")))

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await gateway.openai("chat", request)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.openai("completions", request)

    @api.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await gateway.openai("embeddings", request)

    return api


def build_app(args: dict[str, Any]) -> Any:
    """Serve's entry point for the ``gateway`` application."""
    from ray import serve

    from deployments.gateway_replica import GatewayDeployment

    settings = GatewaySettings.model_validate(args.get("settings") or {})
    deployment = serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=1000)(serve.ingress()(GatewayDeployment))
    return deployment.bind(settings)


__all__ = ["GATEWAY_APP", "Gateway", "build_app", "make_api"]
