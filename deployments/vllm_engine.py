"""vLLM engine applications: Ray's ``LLMServer`` (``ray.serve.llm``) speaking the gateway protocol.

Called by ``deployments.engines.build_app`` for ``runtime: vllm``. The server subclass takes the raw
OpenAI body in one ``generate`` method (``arks_ray.engines.protocol``), so the gateway never imports vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from arks_ray.engines import protocol

if TYPE_CHECKING:
    from ray.serve import Application

    from deployments.engines import EngineAppArgs


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{param}: {first['msg']}{extra}" if param else f"{first['msg']}{extra}", param


def _error_from_engine(err: Any) -> dict[str, Any]:
    """vLLM's ErrorResponse in OpenAI's terms (vLLM types errors by exception class name)."""
    info = err.error
    status = int(getattr(info, "code", 500) or 500)
    return protocol.error(status, str(getattr(info, "message", "engine error")), protocol.error_type(status),
                          getattr(info, "param", None))


def _llm_server_class() -> type:
    """Define the subclass lazily: importing this module must not import vLLM (e.g. for the gateway)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingChatRequest,
        EmbeddingCompletionRequest,
    )
    from ray.serve.llm import LLMServer
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    class ArksLLMServer(LLMServer):  # type: ignore[misc, valid-type]
        """Ray's LLMServer with the gateway protocol on top."""

        def _batch_output_stream(self, generator: Any) -> Any:
            # Ray batches stream chunks every 50 ms, which also holds back the first one; send the first
            # chunk at once (time to first token) and batch the rest as Ray does.
            batch = super()._batch_output_stream

            async def first_then_batched() -> AsyncIterator[list[Any]]:
                try:
                    first = await generator.__anext__()
                except StopAsyncIteration:
                    return
                yield [first]
                async for items in batch(generator):
                    yield items

            return first_then_batched()

        async def generate(self, kind: str, body: dict[str, Any], client_usage: bool = False) -> AsyncIterator[
                str | dict[str, Any]]:
            try:
                if kind == "chat":
                    request: Any = ChatCompletionRequest.model_validate(protocol.with_usage(body))
                elif kind == "completions":
                    request = CompletionRequest.model_validate(protocol.with_usage(body))
                elif kind == "embeddings":
                    cls = EmbeddingChatRequest if "messages" in body else EmbeddingCompletionRequest
                    request = cls.model_validate(body)
                else:
                    yield protocol.error(404, f"unknown endpoint {kind!r}")
                    return
            except ValidationError as exc:
                message, param = _validation_message(exc)
                yield protocol.error(400, message, param=param)
                return
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                # vLLM's "before" validators can raise these directly on ill-typed input (e.g. a number
                # for messages); pydantic only wraps ValueError. Either way it is the client's mistake.
                yield protocol.error(400, f"invalid request: {type(exc).__name__}: {exc}")
                return
            stream = await getattr(self, kind)(request)
            meter = protocol.StreamMeter(client_usage)
            async for item in stream:
                batch = item if isinstance(item, list) else [item]
                texts: list[str] = []
                for part in batch:
                    if isinstance(part, str):
                        texts.append(meter.filter(part))
                    elif isinstance(part, ErrorResponse):
                        if texts:
                            yield "".join(texts)
                        yield _error_from_engine(part)
                        return
                    else:  # a whole response object (non-streaming)
                        yield protocol.response(part.model_dump(mode="json", exclude_none=True))
                        return
                if texts:
                    yield "".join(texts)
            yield meter.final()

    return ArksLLMServer


def build_vllm(args: EngineAppArgs) -> Application:
    """The engine deployment of one vLLM ArksApplication."""
    from ray.serve.llm import LLMConfig, build_llm_deployment

    try:
        config = LLMConfig.model_validate(args.llm_config)
    except ValidationError as exc:
        raise ValueError(f"application {args.name}: invalid engine config: {exc}") from None
    return build_llm_deployment(config, name_prefix="arks-engine:", deployment_cls=_llm_server_class())
