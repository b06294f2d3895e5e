"""The gateway protocol's raw OpenAI bodies as Ray Serve LLM's request models, with client errors as 400.

Used by the engine servers that run inside Ray's LLM servers (``vllm_engine``, ``sglang_engine``): one
parser, so both answer a malformed request the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from arks_ray.engines import protocol


def validation_error(exc: ValidationError) -> dict[str, Any]:
    """A pydantic error as the protocol's 400: the first problem, its field as ``param``."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = f"{param}: {first['msg']}{extra}" if param else f"{first['msg']}{extra}"
    return protocol.error(400, message, param=param)


def parse_request(kind: str, body: dict[str, Any]) -> Any:
    """Ray's ``ChatCompletionRequest`` / ``CompletionRequest`` / embedding request for ``body``, or a
    protocol error (a dict) when the body is not one."""
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingChatRequest,
        EmbeddingCompletionRequest,
    )

    models: dict[str, Any] = {"chat": ChatCompletionRequest, "completions": CompletionRequest,
                              "embeddings": EmbeddingChatRequest if "messages" in body else EmbeddingCompletionRequest}
    if kind not in models:
        return protocol.error(404, f"unknown endpoint {kind!r}")
    try:
        return models[kind].model_validate(body)
    except ValidationError as exc:
        return validation_error(exc)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # vLLM's "before" validators can raise these directly on ill-typed input (e.g. a number for
        # messages); pydantic only wraps ValueError. Either way it is the client's mistake.
        return protocol.error(400, f"invalid request: {type(exc).__name__}: {exc}")
