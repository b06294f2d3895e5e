"""SGLang engine applications: Ray's ``SGLangServer`` speaking the gateway protocol.

Called by ``deployments.engines.build_app`` for ``runtime: sglang``. The deployment is built by Ray's
``build_llm_deployment`` with a subclass of ``SGLangServer`` (``ray.llm._internal.serve.engines.sglang``),
which runs ``sglang.srt.ray.engine.RayEngine(**engine_kwargs)`` in the replica: the engine kwargs are
SGLang ``ServerArgs`` fields, rendered by ``arks_ray.render.serve_config.sglang_engine_kwargs``, and the
placement group is one bundle per pod (``arks_ray.render.placement``). SGLang itself needs CUDA and is
only in the SGLang worker image; importing this module imports neither SGLang nor vLLM.

What the gateway protocol adds over Ray's server: one ``generate(EngineRequest)`` method; the
stream ends with ``data: [DONE]`` (Ray's SGLang server does not send it); and, because Ray's SGLang
stream carries no usage chunk, a stream's final usage is the count of content chunks, which the gateway
completes with its prompt estimate. Whole responses carry SGLang's own usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from arks_ray.engines.protocol import EngineItem, EngineRequest
from deployments.engine_stream import engine_items

if TYPE_CHECKING:
    from ray.serve import Application

    from deployments.engines import EngineAppArgs


def _sglang_server_class() -> type:
    """Define the subclass lazily: Ray's SGLang module imports the OpenAI protocol models of an engine."""
    from ray.llm._internal.serve.engines.sglang import SGLangServer

    class ArksSGLangServer(SGLangServer):
        """Ray's SGLangServer with the gateway protocol on top."""

        async def generate(self, request: EngineRequest) -> AsyncIterator[EngineItem]:
            """The gateway's port (``arks_ray.engines.protocol``); Ray's SGLang methods are async generators."""
            async for item in engine_items(self, request):
                yield item

    return ArksSGLangServer


def build_sglang(args: EngineAppArgs) -> Application:
    """The engine deployment of one SGLang ArksApplication (SGLang is imported only when it starts)."""
    from ray.serve.llm import build_llm_deployment

    from arks_ray.render.lora import ENGINE_PREFIX

    config = args.ray_llm_config()
    if "model_path" not in config.engine_kwargs:
        raise ValueError(f"application {args.name}: engine_kwargs has no model_path (SGLang's ServerArgs needs one)")
    return build_llm_deployment(config, name_prefix=ENGINE_PREFIX, deployment_cls=_sglang_server_class())
