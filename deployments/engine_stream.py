"""One stream adapter for the engines that run inside Ray's LLM servers (vLLM's ``LLMServer``, SGLang's).

Called by the ``generate`` method of ``deployments.vllm_engine`` and ``deployments.sglang_engine``: it
parses the raw OpenAI body into Ray's request model, calls the server's own method for the kind, and turns
what comes back into the gateway's typed items (``arks_ray.engines.protocol``). Failures are classified
here, at the boundary: what the engine refuses as invalid is the client's (400, a clean message, no Ray
internals), anything else is the engine's.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from arks_ray.engines.protocol import DONE, Answer, Chunk, EngineItem, EngineRequest, Failure, invalid, with_usage
from arks_ray.engines.sse import StreamMeter
from deployments.openai_requests import client_failure, is_client_error, parse_request, validation_failure

logger = logging.getLogger("ray.serve.arks.engines")

def engine_failure(part: Any) -> Failure:
    """An engine's ``ErrorResponse`` (vLLM's or Ray's: both carry ``error`` with code, message, param)."""
    info = part.error
    status = int(getattr(info, "code", 500) or 500)
    message = str(getattr(info, "message", "") or "engine error")[:500]
    if status < 500 and status not in (408, 429):
        return invalid(message, getattr(info, "param", None), status)
    logger.warning("engine error %d: %s", status, message)
    if status in (429, 503):  # overloaded or not ready: worth a retry elsewhere, or later
        return Failure("unavailable", 503, "the engine cannot take this request right now")
    return Failure("engine", 500, "the engine failed to answer this request")


def _is_error(part: Any) -> bool:
    return type(part).__name__.endswith("ErrorResponse") and hasattr(part, "error")


async def engine_items(server: Any, request: EngineRequest, on_first: Callable[[], None] = lambda: None,
                       meter: StreamMeter | None = None) -> AsyncIterator[EngineItem]:
    """The items of one request served by ``server`` (a Ray LLM server with chat/completions/embeddings)."""
    meter = meter or StreamMeter(request.client_usage)
    body = with_usage(request.body, meter.running) if request.kind != "embeddings" else request.body
    parsed = parse_request(request.kind, body)
    if isinstance(parsed, Failure):
        yield parsed
        return
    streamed = done = False
    try:
        result = getattr(server, request.kind)(parsed)
        stream = await result if inspect.isawaitable(result) else result
        async for item in stream:
            batch = item if isinstance(item, list) else [item]
            texts: list[str] = []
            counted = meter.completion_tokens
            for part in batch:
                if isinstance(part, str):
                    texts.append(meter.filter(part))
                elif _is_error(part):
                    if texts:
                        yield Chunk("".join(texts), meter.completion_tokens - counted)
                    yield engine_failure(part)
                    return
                elif isinstance(part, BaseModel):  # a whole response (non-streaming)
                    yield Answer(part.model_dump(mode="json", exclude_none=True))
                    return
            text = "".join(texts)
            if text:
                done = done or DONE in text
                if not streamed:
                    streamed = True
                    on_first()
                yield Chunk(text, meter.completion_tokens - counted)
    except ValidationError as exc:
        yield validation_failure(exc)
        return
    except Exception as exc:
        # Before any output, an engine refusing the input is the client's; after it, the engine broke.
        if is_client_error(exc) and not streamed:
            yield client_failure(exc)
            return
        logger.exception("engine failed%s", " mid-stream" if streamed else "")
        yield Failure("engine", 500, "the engine failed mid-stream" if streamed else
                      "the engine failed to answer this request")
        return
    if streamed and not done:  # Ray's SGLang server ends its streams without [DONE]
        yield Chunk(DONE)
    yield meter.final()
