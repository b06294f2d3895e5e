"""The protocol between the gateway and engine deployments (vLLM, SGLang, Dynamo, HTTP backends).

An engine's ``generate(kind, body, client_usage)`` is an async stream of items:

- ``str``: Server-Sent Events text, already framed (``data: {...}\\n\\n``), forwarded verbatim;
- ``dict`` with an ``"arks"`` key: a control message, never forwarded as is:
  - ``{"arks": "response", "status": 200, "body": {...}}``: a whole (non-streaming) response;
  - ``{"arks": "error", "status": 4xx/5xx, "body": {"error": {...}}}``: the request failed;
  - ``{"arks": "usage", "usage": {...}, "completion_tokens": n}``: the final usage of a stream.

Engines always ask their backend for the usage chunk of a stream, and drop it from the forwarded
text unless the client asked for it (``client_usage``), so metering never depends on the client.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

KINDS = ("chat", "completions", "embeddings")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}
"""The OpenAI HTTP path of each kind, for engines reached over HTTP."""
DONE = "data: [DONE]\n\n"


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_exceeded"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def response(body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    return {"arks": "response", "status": status, "body": body}


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | int | None = None) -> dict[str, Any]:
    return {"arks": "error", "status": status,
            "body": {"error": {"message": message, "type": type_, "code": code, "param": param}}}


def usage(value: dict[str, Any] | None, completion_tokens: int) -> dict[str, Any]:
    return {"arks": "usage", "usage": value, "completion_tokens": completion_tokens}


def wants_usage(body: dict[str, Any]) -> bool:
    """Did the client ask for the usage chunk of a stream?"""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def with_usage(body: dict[str, Any]) -> dict[str, Any]:
    """The request as sent to the backend: streams always carry the usage chunk."""
    if not body.get("stream"):
        return body
    given = body.get("stream_options")
    opts: dict[str, Any] = given if isinstance(given, dict) else {}
    return {**body, "stream_options": {**opts, "include_usage": True}}


class StreamMeter:
    """Watches forwarded SSE events: finds the usage chunk, strips it if unwanted, counts output.

    ``completion_tokens`` counts content-bearing chunks, which is exact for vLLM (one token per chunk)
    and an estimate elsewhere; it is what a stream that ends early is charged for.
    """

    def __init__(self, client_usage: bool) -> None:
        self.client_usage = client_usage
        self.usage: dict[str, Any] | None = None
        self.completion_tokens = 0

    def filter(self, text: str) -> str:
        """The part of ``text`` (one or more SSE events) to forward to the client."""
        if '"usage"' not in text and '"choices":[]' not in text:
            self.completion_tokens += text.count("data: {")
            return text
        kept = []
        for event in text.split("\n\n"):
            if not event:
                continue
            if self._is_usage_event(event):
                if self.client_usage:
                    kept.append(event)
                continue
            if event.startswith("data: {"):
                self.completion_tokens += 1
            kept.append(event)
        return "".join(e + "\n\n" for e in kept)

    def _is_usage_event(self, event: str) -> bool:
        if not event.startswith("data: {") or '"usage"' not in event:
            return False
        try:
            data = json.loads(event[6:])
        except json.JSONDecodeError:
            return False
        found = data.get("usage") if isinstance(data, dict) else None
        if isinstance(found, dict) and not data.get("choices"):
            self.usage = found
            return True
        return False

    def final(self) -> dict[str, Any]:
        return usage(self.usage, self.completion_tokens)


class RequestBody(dict[str, Any]):
    """The raw OpenAI body as sent to an engine deployment: a plain dict to the engine.

    Ray's prefix-cache-affinity request router reads ``.messages`` or ``.prompt`` off the request's
    arguments to pick a replica; this gives the dict those attributes, present only when the key is.
    """

    def __getattr__(self, name: str) -> Any:
        if name in ("messages", "prompt") and name in self:
            return self[name]
        raise AttributeError(name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RequestBody, (dict(self),))


class SseSplitter:
    """Cuts a byte stream of Server-Sent Events into whole events (``data: ...\\n\\n`` text).

    HTTP chunks split events anywhere; ``StreamMeter`` and the gateway need whole ones."""

    def __init__(self) -> None:
        self._buffer = ""
        # Incremental: a chunk may end in the middle of a multi-byte character.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes) -> str:
        """The whole events completed by ``chunk`` (possibly none), as text."""
        self._buffer += self._decoder.decode(chunk).replace("\r\n", "\n")
        cut = self._buffer.rfind("\n\n")
        if cut < 0:
            return ""
        whole, self._buffer = self._buffer[: cut + 2], self._buffer[cut + 2:]
        return whole

    def rest(self) -> str:
        """What is left when the stream ends: an event without its blank line is still an event."""
        rest, self._buffer = (self._buffer + self._decoder.decode(b"", final=True)).strip("\n"), ""
        return rest + "\n\n" if rest else ""


async def relay_sse(chunks: AsyncIterable[bytes], meter: StreamMeter, cut_short: str) -> AsyncIterator[Any]:
    """An HTTP engine's SSE byte stream as protocol items: whole events through ``meter``, then the final
    usage; or, if the stream ended before ``[DONE]``, a 502 saying ``cut_short``."""
    splitter = SseSplitter()

    async def events() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield splitter.feed(chunk)
        yield splitter.rest()

    done = False
    async for text in events():
        if text:
            done = done or DONE in text
            forwarded = meter.filter(text)
            if forwarded:
                yield forwarded
    if not done:
        yield error(502, cut_short, "server_error")
        return
    yield meter.final()
