"""The typed port between the gateway and its backends (vLLM, SGLang, Dynamo, HTTP services).

A backend answers one ``EngineRequest`` with an async stream of ``EngineItem``:

- ``Chunk``: Server-Sent Events text, already framed (``data: {...}\\n\\n``), forwarded verbatim;
- ``Answer``: a whole (non-streaming) response, the stream's only item;
- ``Failure``: the request failed; its ``kind`` says whose fault it was (``FailureKind``);
- ``Final``: the usage of a stream, its last item, never forwarded.

Engines always ask their backend for the usage chunk of a stream and drop it from the forwarded text
unless the client asked for it (``EngineRequest.client_usage``), so metering never depends on the client.
The types cross process boundaries (Serve handles pickle them), so they are small frozen dataclasses.

Used by the gateway pipeline (``deployments.pipeline``), the engine servers (``deployments.engine_stream``)
and the HTTP upstreams (``deployments.upstream``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

KINDS = ("chat", "completions", "embeddings", "responses")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings",
         "responses": "/v1/responses"}
"""The OpenAI HTTP path of each kind, for engines reached over HTTP."""
DONE = "data: [DONE]\n\n"
FRONT_DEPLOYMENT = "arks-front"
"""An engine app's placeholder ingress deployment (``deployments.engines``), only under Ray's HAProxy ingress and
only for an engine with a custom request router. The gateway asks it once for the engine's deployment, sends no
request through it, and does not count its replicas."""

FailureKind = Literal["invalid", "unavailable", "timeout", "engine"]
"""Whose fault a failure is: ``invalid`` is the client's (4xx: no retry, no breaker, no traffic shift);
``unavailable`` (no replica, unreachable), ``timeout`` and ``engine`` (it died, or a 5xx) count against
the backend."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One OpenAI request as the gateway sends it to a backend."""

    kind: str
    body: dict[str, Any]
    client_usage: bool = False
    """Did the client ask for the usage chunk of a stream (``stream_options.include_usage``)?"""
    session: str | None = None
    """Session id for consistent-hash routing (Serve apps only)."""

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True and self.kind != "embeddings"

    def __getattr__(self, name: str) -> Any:
        # Ray's prefix-cache-affinity router reads ``.messages`` or ``.prompt`` off a request's arguments
        # (present only when the body has them, so ``hasattr`` tells the two apart).
        if name in ("messages", "prompt") and name in self.body:
            return self.body[name]
        raise AttributeError(name)


@dataclass(frozen=True, slots=True)
class Chunk:
    """SSE text (one or more whole events) to forward as is, and the output tokens it carries as the engine
    counted them (None: one per event, as the gateway then counts them)."""

    text: str
    tokens: int | None = None

    def counted(self) -> int:
        """The output tokens to charge for this text if the stream ends without the engine's usage."""
        tokens = getattr(self, "tokens", None)  # None too in a Chunk pickled by an engine older than the field
        return self.text.count("data: {") if tokens is None else tokens


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole response: status (below 400) and its JSON body."""

    body: dict[str, Any]
    status: int = 200


@dataclass(frozen=True, slots=True)
class Failure:
    """The request failed. ``message`` is safe to show the client: no host, URL, credential or trace."""

    kind: FailureKind
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @property
    def blames_backend(self) -> bool:
        return self.kind != "invalid"

    def body(self) -> dict[str, Any]:
        """OpenAI's error envelope."""
        return {"error": {"message": self.message, "type": error_type(self.status), "code": self.code,
                          "param": self.param}}


@dataclass(frozen=True, slots=True)
class Final:
    """The last item of a stream: the engine's usage object (None if it sent none) and the content-bearing
    events it counted (what a stream is charged when the usage is missing)."""

    usage: dict[str, Any] | None = None
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


EngineItem = Chunk | Answer | Failure | Final


class EngineStream(Protocol):
    """One request's answer: the items, and a way to stop the engine's work early."""

    def __aiter__(self) -> AsyncIterator[EngineItem]: ...
    def cancel(self) -> None: ...


class Engine(Protocol):
    """What a backend server offers the gateway (the ``generate`` method of every engine deployment)."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineItem]: ...


def invalid(message: str, param: str | None = None, status: int = 400, code: str | None = None) -> Failure:
    """The client's mistake."""
    return Failure("invalid", status, message, param, code)


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_exceeded"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def upstream_failure(status: int, message: str, param: str | None = None) -> Failure:
    """An HTTP status from a backend as a failure: 4xx (but 408/429) is the client's, the rest the backend's."""
    if 400 <= status < 500 and status not in (408, 429):
        return Failure("invalid", status, message, param)
    if status in (408, 504):
        return Failure("timeout", 504, message)
    return Failure("unavailable" if status in (429, 503) else "engine", 503 if status in (429, 503) else 502,
                   message)


def wants_usage(body: dict[str, Any]) -> bool:
    """Did the client ask for the usage chunk of a stream?"""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def wants_running_usage(body: dict[str, Any]) -> bool:
    """Did the client ask for the running usage on every chunk (vLLM's ``continuous_usage_stats``)?"""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("continuous_usage_stats"))


def with_usage(body: dict[str, Any], running: bool = False) -> dict[str, Any]:
    """The request as sent to the backend: streams always carry the usage chunk, and with ``running`` the
    running usage on every chunk too (``StreamMeter``). A client's own ``stream_interval`` (vLLM's, per
    request) is dropped: its events would carry more tokens than a stream cut short is charged for."""
    if not body.get("stream"):
        return body
    given = body.get("stream_options")
    opts: dict[str, Any] = given if isinstance(given, dict) else {}
    sent = {k: v for k, v in body.items() if k != "stream_interval"}
    return {**sent, "stream_options": {**opts, "include_usage": True, **({"continuous_usage_stats": True}
                                                                           if running else {})}}
