"""The OpenAI Responses API (``/v1/responses``) on a vLLM replica, as the gateway's typed items.

Called by ``deployments.vllm_engine.ArksLLMServer.generate`` for kind ``responses``. Ray's ``LLMServer``
has no Responses method, but the vLLM app state Ray builds holds vLLM's own ``OpenAIServingResponses``;
this drives it directly. Streams are vLLM's named events (``event: <type>`` + ``data: {...}``), which the
gateway forwards as they are; the usage of ``response.completed`` becomes the stream's ``Final``, in the
gateway's terms (prompt and completion tokens). The gateway refuses what needs stored state before this
point (``previous_response_id``, ``store: true``, ``background``); vLLM's own store stays off.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import ValidationError

from arks_ray.engines.protocol import Answer, Chunk, EngineItem, EngineRequest, Failure, Final, invalid
from deployments.engine_stream import engine_failure
from deployments.openai_requests import client_failure, is_client_error, validation_failure

logger = logging.getLogger("ray.serve.arks.engines")


def usage_of(usage: Any) -> dict[str, Any] | None:
    """A Responses usage object (input/output tokens) in the gateway's chat terms."""
    if usage is None:
        return None
    prompt, completion = int(usage.input_tokens), int(usage.output_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(event: Any) -> str:
    return f"event: {event.type}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"


async def responses_items(server: Any, request: EngineRequest, on_first: Callable[[], None],
                          resolve: Callable[[], Any], stride: int = 1) -> AsyncIterator[EngineItem]:
    """The items of one Responses request on ``server`` (an ``ArksLLMServer`` whose engine is started);
    ``resolve`` loads the request's LoRA adapter, if any, before vLLM looks it up. A stream that ends early is
    charged its delta events (text, reasoning, tool-call arguments): one token for the first, then ``stride``,
    the tokens vLLM hands over at once (``arks_ray.engines.cadence``). That is an estimate: vLLM's Responses
    stream has no running usage, and a slow reader's merged outputs carry more."""
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse

    handler = getattr(getattr(server.engine, "_app_state", None), "openai_serving_responses", None)
    if handler is None:
        yield invalid("this model does not serve /v1/responses", status=404, code="unsupported_endpoint")
        return
    try:
        parsed = ResponsesRequest.model_validate({**request.body, "store": False})
        await resolve()
        result = await handler.create_responses(parsed, None)
    except ValidationError as exc:
        yield validation_failure(exc)
        return
    except Exception as exc:
        if is_client_error(exc):
            yield client_failure(exc)
            return
        logger.exception("engine failed on a Responses request")
        yield Failure("engine", 500, "the engine failed to answer this request")
        return
    if isinstance(result, ResponsesResponse):
        yield Answer(result.model_dump(mode="json", by_alias=True))  # as vLLM answers it
        return
    if hasattr(result, "error"):
        yield engine_failure(result)
        return
    usage: dict[str, Any] | None = None
    counted = 0
    try:
        async for event in result:
            tokens = 0
            if event.type.endswith(".delta"):
                tokens = stride if counted else 1
                if not counted:
                    on_first()
            elif event.type in ("response.completed", "response.incomplete", "response.failed"):
                usage = usage_of(getattr(event.response, "usage", None))
            counted += tokens
            yield Chunk(sse(event), tokens)
    except Exception:
        logger.exception("engine failed mid-stream on a Responses request")
        yield Failure("engine", 500, "the engine failed mid-stream")
        return
    yield Final(usage, counted)
