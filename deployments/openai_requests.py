"""The gateway protocol's raw OpenAI bodies as Ray Serve LLM's request models, with client errors as 400.

Used by the engine stream adapter (``deployments.engine_stream``) that both vLLM and SGLang servers run:
one parser, so both answer a malformed request the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from arks_ray.engines.protocol import Failure, invalid

CLIENT_ERRORS = (ValueError, TypeError, KeyError, OverflowError, UnicodeError, IndexError, AttributeError)
"""Python's own exceptions that engines raise on input they cannot take (validators, tokenizers)."""
CLIENT_ERROR_BASES = frozenset({"VLLMClientError"})
"""Engine exception classes that say "the request's fault" (vLLM maps them to 4xx; matched by name so that
this module imports no engine)."""


def is_client_error(exc: BaseException) -> bool:
    """Did the engine refuse the request itself (the client's mistake), rather than fail?"""
    if isinstance(exc, CLIENT_ERRORS):
        return True
    return any(cls.__name__ in CLIENT_ERROR_BASES for cls in type(exc).__mro__)


def client_failure(exc: BaseException) -> Failure:
    """An engine's refusal as a 400: the first line of its message, and its parameter when it names one."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    param = getattr(exc, "parameter", None)
    return invalid(f"invalid request: {first}"[:500], param=param if isinstance(param, str) else None)


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
    except Exception as exc:
        # vLLM's "before" validators raise Python's own errors on ill-typed input (a number for messages),
        # and its own VLLMValidationError on values it refuses (tool_choice: 5); pydantic wraps neither.
        if is_client_error(exc):
            return client_failure(exc)
        raise
