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
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from arks_ray.api.gateway import GATEWAY_APP, Backend, GatewayConfig
from arks_ray.engines import protocol
from arks_ray.errors import BackendUnavailable, InvalidRequest, RequestError, RequestTooLarge, to_openai_error
from arks_ray.gateway.governor import Admission, Governor
from arks_ray.gateway.index import GatewayIndex
from arks_ray.gateway.limits import Usage, estimate_usage, usage_from
from arks_ray.gateway.routing import choose_backend
from arks_ray.gateway.settings import GatewaySettings
from arks_ray.stores.base import CounterStore
from arks_ray.stores.memory import MemoryStore

logger = logging.getLogger("ray.serve.arks.gateway")

DEPLOYMENT_NAME = "ArksGateway"


class EngineStream(Protocol):
    def __aiter__(self) -> AsyncIterator[Any]: ...


class Backends(Protocol):
    """How the gateway reaches a backend: returns the protocol stream of one request."""

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool) -> Any: ...


class ServeBackends:
    """Backends reached through Serve deployment handles, one cached handle per application."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def open(self, backend: Backend, kind: str, body: dict[str, Any], client_usage: bool) -> Any:
        if backend.kind != "app":
            raise BackendUnavailable(f"backend {backend.name!r} of kind {backend.kind} is not supported yet")
        handle = self._handles.get(backend.name)
        if handle is None:
            from ray import serve

            try:
                # One configured handle per app, reused: options() builds a new handle each call.
                handle = serve.get_app_handle(backend.name).options(stream=True, method_name="generate")
            except Exception as exc:  # the app is missing or not deployed yet
                raise BackendUnavailable(f"backend {backend.name!r} is not available: {exc}") from None
            self._handles[backend.name] = handle
        return handle.remote(kind, body, client_usage)


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


class Metrics(Protocol):
    def request(self, model: str, status: int) -> None: ...
    def tokens(self, model: str, usage: Usage) -> None: ...
    def limited(self, model: str, kind: str) -> None: ...
    def store_failure(self, operation: str) -> None: ...


class NoMetrics:
    def request(self, model: str, status: int) -> None: ...
    def tokens(self, model: str, usage: Usage) -> None: ...
    def limited(self, model: str, kind: str) -> None: ...
    def store_failure(self, operation: str) -> None: ...


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
            return await self._forward(kind, body, endpoint, admission)
        except BaseException:
            self._settle(admission, model, Usage(0, 0))
            raise

    async def _forward(self, kind: str, body: dict[str, Any], endpoint: Any, admission: Admission) -> Response:
        backend = choose_backend(endpoint, self.rng)
        stream = body.get("stream") is True and kind != "embeddings"
        gen = self.backends.open(backend, kind, body, protocol.wants_usage(body))
        iterator = gen.__aiter__()
        try:
            first = await iterator.__anext__()
        except asyncio.CancelledError:
            _cancel(gen)  # the client left before the first byte: stop the engine too
            raise
        except StopAsyncIteration:
            raise BackendUnavailable(f"backend {backend.name!r} returned nothing") from None
        except RequestError:
            raise
        except Exception as exc:
            logger.warning("backend %s failed before its first byte: %s", backend.name, exc)
            raise BackendUnavailable(f"backend {backend.name!r} failed: {type(exc).__name__}") from None
        if isinstance(first, dict):
            # A whole response or an error is the engine's last item: nothing left to cancel.
            status = int(first.get("status", 502))
            payload = first.get("body", {})
            est = admission.estimate
            used = usage_from(payload.get("usage"), est.prompt_tokens, est.completion_tokens) if status < 400 \
                else Usage(0, 0)
            self._settle(admission, endpoint.name, used)
            self.metrics.request(endpoint.name, status)
            return JSONResponse(payload, status_code=status, headers=admission.headers)
        if not stream:
            _cancel(gen)
            raise BackendUnavailable(f"backend {backend.name!r} answered a non-streaming request with a stream")
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **admission.headers}
        return StreamingResponse(self._relay(first, iterator, gen, admission, endpoint.name),
                                 media_type="text/event-stream", headers=headers)

    async def _relay(self, first: str, iterator: AsyncIterator[Any], gen: Any, admission: Admission,
                     model: str) -> AsyncIterator[str]:
        final: dict[str, Any] | None = None
        events = first.count("data: {")
        status = 200
        finished = False
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
                    # Headers are gone: report in-band, as vLLM does, then end the stream properly.
                    yield f"data: {json.dumps(item.get('body', {}))}\n\n" + protocol.DONE
                    return
            finished = True
        finally:
            if not finished:
                _cancel(gen)  # the client left, or the stream failed: stop the engine's work
            # Disconnects and failures are charged what was generated: the engine's own count when it
            # finished, else the events relayed (the first carries only the role: a 1-token overcount).
            counted = int(final["completion_tokens"]) if final else events
            used = usage_from(final.get("usage") if final else None, admission.estimate.prompt_tokens, counted)
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

    async def drain(self) -> None:
        """Wait for pending settlements (tests, shutdown)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)


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


class ServeMetrics:
    """Gateway metrics through ``ray.serve.metrics`` (exported by Ray's metrics agent, ``ray_`` prefix)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter("arks_gateway_requests", "Requests by model and status.",
                                         tag_keys=("model", "status"))
        self._tokens = metrics.Counter("arks_gateway_tokens", "Tokens by model and type.", tag_keys=("model", "type"))
        self._limited = metrics.Counter("arks_gateway_limited", "Requests refused by limits.",
                                        tag_keys=("model", "kind"))
        self._store = metrics.Counter("arks_gateway_store_failures", "Counter store failures by operation.",
                                      tag_keys=("operation",))

    def request(self, model: str, status: int) -> None:
        self._requests.inc(tags={"model": model, "status": str(status)})

    def tokens(self, model: str, usage: Usage) -> None:
        if usage.prompt_tokens:
            self._tokens.inc(usage.prompt_tokens, tags={"model": model, "type": "prompt"})
        if usage.completion_tokens:
            self._tokens.inc(usage.completion_tokens, tags={"model": model, "type": "completion"})

    def limited(self, model: str, kind: str) -> None:
        self._limited.inc(tags={"model": model, "kind": kind})

    def store_failure(self, operation: str) -> None:
        self._store.inc(tags={"operation": operation})


def make_store(settings: GatewaySettings) -> CounterStore:
    if settings.redis_url:
        from arks_ray.stores.redis import RedisStore

        return RedisStore(settings.redis_url, timeout_s=settings.store_timeout_s)
    return MemoryStore()


class GatewayDeployment:
    """The Serve deployment: one ``Gateway`` per replica, its HTTP app built inside the replica."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.gateway = Gateway(settings, ServeBackends(), store=make_store(settings), metrics=ServeMetrics())
        self._restoring: asyncio.Task[int] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.gateway.reconfigure(user_config)
        # In the background: a restore may have to wait for Redis, and reconfigure must not block.
        self._restoring = asyncio.get_running_loop().create_task(self.gateway.restore_quota_usage())

    async def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.gateway)


def build_app(args: dict[str, Any]) -> Any:
    """Serve's entry point for the ``gateway`` application."""
    from ray import serve

    settings = GatewaySettings.model_validate(args.get("settings") or {})
    deployment = serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=1000)(serve.ingress()(GatewayDeployment))
    return deployment.bind(settings)


__all__ = ["GATEWAY_APP", "Gateway", "GatewayDeployment", "build_app", "make_api"]
