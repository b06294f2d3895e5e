"""Server-Sent Events as the engines and upstreams relay them: whole events, metered, usage kept apart.

Used by the engine stream adapter (``deployments.engine_stream``) on the text vLLM and SGLang produce,
and by the HTTP upstream (``deployments.upstream``) on the bytes an OpenAI-compatible server sends.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from arks_ray.engines.protocol import DONE, Chunk, EngineItem, Failure, Final


class StreamMeter:
    """Watches forwarded SSE events: finds the usage, strips it if unwanted, counts output.

    The usage may come on a chunk of its own (``"choices": []``, as vLLM sends it) or on the last chunk
    that still has choices (as many OpenAI-compatible servers do). Either way it is recorded; the
    usage-only chunk is dropped and the usage field of a content chunk removed unless the client asked
    for it. ``completion_tokens`` counts the output tokens of the events, an estimate that is what a stream
    that ends early is charged for: one per event, exact for vLLM handing over every token (a 1-token
    overcount: the role chunk); with vLLM's ``stride`` > 1 (its ``stream_interval``), one for the first event
    and ``stride`` for each later one, within one stride of what the client received.
    """

    def __init__(self, client_usage: bool, stride: int = 1) -> None:
        self.client_usage = client_usage
        self.stride = stride
        self.usage: dict[str, Any] | None = None
        self.completion_tokens = 0
        self._events = 0

    def _count(self, events: int) -> None:
        if self.stride > 1 and events:
            self.completion_tokens += events * self.stride - (self.stride - 1 if self._events == 0 else 0)
        else:
            self.completion_tokens += events
        self._events += events

    def filter(self, text: str) -> str:
        """The part of ``text`` (one or more whole SSE events) to forward to the client."""
        if '"usage"' not in text:
            self._count(text.count("data: {"))
            return text
        kept = []
        for event in text.split("\n\n"):
            if not event:
                continue
            kept_event = self._event(event)
            if kept_event:
                kept.append(kept_event)
        return "".join(e + "\n\n" for e in kept)

    def _event(self, event: str) -> str:
        if not event.startswith("data: {"):
            return event
        if '"usage"' not in event:
            self._count(1)
            return event
        try:
            data = json.loads(event[6:])
        except json.JSONDecodeError:
            self._count(1)
            return event
        found = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(found, dict):
            self._count(1)
            return event
        self.usage = found
        if not data.get("choices"):  # a usage-only chunk
            return event if self.client_usage else ""
        self._count(1)
        if self.client_usage:
            return event
        return "data: " + json.dumps({k: v for k, v in data.items() if k != "usage"}, separators=(",", ":"))

    def final(self) -> Final:
        return Final(self.usage, self.completion_tokens)


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


async def relay_sse(chunks: AsyncIterable[bytes], meter: StreamMeter, cut_short: Failure) -> AsyncIterator[EngineItem]:
    """An HTTP engine's SSE byte stream as engine items: whole events through ``meter``, then ``Final``;
    or ``cut_short`` if the stream ended before ``[DONE]``."""
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
                yield Chunk(forwarded)
    if not done:
        yield cut_short
        return
    yield meter.final()


async def paced(chunks: AsyncIterable[bytes], interval_s: float, *, clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> AsyncIterator[bytes]:
    """An HTTP stream read at most once per ``interval_s``, so that each relayed item carries what arrived
    meanwhile (aiohttp's ``iter_any`` returns everything buffered). Every item costs CPU in each Serve hop
    behind the gateway; fewer, larger items leave more of it to the streams.

    Never held back: the reads up to the first content event (vLLM sends the role on an event of its own,
    then the first token) and the read after one with ``[DONE]`` (the end of the stream). ``sleep`` is the wait
    between reads; ``deployments.upstream.until_eof``'s ends when the upstream ends its answer, so the last
    tokens are not held an interval either. ``interval_s`` 0 reads as the bytes come."""
    if interval_s <= 0:
        async for chunk in chunks:
            yield chunk
        return
    events = 0
    async for chunk in chunks:
        due = clock() + interval_s
        yield chunk
        events += chunk.count(b"data: ")
        if events >= 2 and b"[DONE]" not in chunk:
            wait = due - clock()
            if wait > 0:
                await sleep(wait)
