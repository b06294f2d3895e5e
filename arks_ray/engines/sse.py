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
    for it. ``completion_tokens`` counts the output tokens relayed, what a stream that ends early is charged for.

    With ``running`` the engine was asked to put its running usage on every event (vLLM's
    ``stream_options.continuous_usage_stats``, ``with_usage``): each choice's latest ``completion_tokens``,
    summed, is exact however many tokens an event carries (vLLM's ``stream_interval``, outputs it merged for a
    slow reader, speculative decoding, events its parsers held back). Those usages are stripped unless the
    client asked for them too (``client_running``). Otherwise each content-bearing event counts one token:
    exact for vLLM handing over every token (the role chunk adds one), an estimate elsewhere.
    """

    def __init__(self, client_usage: bool, running: bool = False, client_running: bool = False) -> None:
        self.client_usage = client_usage
        self.running = running
        self.client_running = client_running
        self.usage: dict[str, Any] | None = None
        self._choices: dict[int, int] = {}  # running: each choice's latest count
        self._uncounted = 0  # events that carried no running count, one token each

    @property
    def completion_tokens(self) -> int:
        """The output tokens relayed so far (see the class)."""
        return sum(self._choices.values()) + self._uncounted

    def filter(self, text: str) -> str:
        """The part of ``text`` (one or more whole SSE events) to forward to the client."""
        if '"usage"' not in text:
            self._uncounted += text.count("data: {")
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
            self._uncounted += 1
            return event
        try:
            data = json.loads(event[6:])
        except json.JSONDecodeError:
            self._uncounted += 1
            return event
        found = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(found, dict):
            self._uncounted += 1
            return event
        choices = data.get("choices")
        if not choices:  # a usage-only chunk
            self.usage = found
            return event if self.client_usage else ""
        count = found.get("completion_tokens")
        if self.running and isinstance(count, int) and not isinstance(count, bool) and isinstance(choices, list):
            for choice in choices:
                index = choice.get("index", 0) if isinstance(choice, dict) else 0
                self._choices[index] = max(self._choices.get(index, 0), count)
            keep = self.client_running
        else:
            self.usage = found  # a server's usage on its last content chunk
            self._uncounted += 1
            keep = self.client_usage
        if keep:
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
