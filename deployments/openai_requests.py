"""The gateway protocol's raw OpenAI bodies as Ray Serve LLM's request models, with client errors as 400.

Used by the engine stream adapter (``deployments.engine_stream``) that both vLLM and SGLang servers run:
one parser, so both answer a malformed request the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from arks_ray.engines.protocol import Failure, invalid


def validation_failure(exc: ValidationError) -> Failure:
    """A pydantic error as a 400: the first problem, its field as ``param`` (no input echoed back)."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = f"{param}: {first['msg']}{extra}" if param else f"{first['msg']}{extra}"
    return invalid(message[:500], param=param)


def parse_request(kind: str, body: dict[str, Any]) -> Any:
    """Ray's ``ChatCompletionRequest`` / ``CompletionRequest`` / embedding request for ``body``, or a
    ``Failure`` when the body is not one."""
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingChatRequest,
        EmbeddingCompletionRequest,
    )

    models: dict[str, Any] = {"chat": ChatCompletionRequest, "completions": CompletionRequest,
                              "embeddings": EmbeddingChatRequest if "messages" in body else EmbeddingCompletionRequest}
    if kind not in models:
        return invalid(f"this model does not serve /v1/{kind}", status=404, code="unsupported_endpoint")
    try:
        return models[kind].model_validate(body)
    except ValidationError as exc:
        return validation_failure(exc)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # vLLM's "before" validators can raise these directly on ill-typed input (e.g. a number for
        # messages); pydantic only wraps ValueError. Either way it is the client's mistake.
        return invalid(f"invalid request: {type(exc).__name__}: {str(exc)[:300]}")
