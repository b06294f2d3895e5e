"""Engine applications: ``deployments.engines:build_app`` is the import path of every rendered engine app.

Serve calls ``build_app(args)`` with the ``args`` the renderer wrote; ``spec.runtime`` picks the module
that builds the engine deployment (``vllm_engine``, ...). Each engine speaks the gateway protocol
(``arks_ray.engines.protocol``): one ``generate`` method that takes the raw OpenAI body, so the gateway
imports no engine.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.serve import Application

from arks_ray.engines.protocol import FRONT_DEPLOYMENT

logger = logging.getLogger("ray.serve.arks.engines")


class _Deferred:
    """Stands for the module ``name`` and imports it on its first attribute use (``deferred_imports``)."""

    __spec__ = None  # importlib reads this off a module it finds in sys.modules: reading it must not import

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str) -> Any:
        name = object.__getattribute__(self, "_name")
        modules: dict[str, Any] = sys.modules
        if modules.get(name) is self:  # used within the block: the real module takes its place
            del modules[name]
        return getattr(importlib.import_module(name), attr)

    def __repr__(self) -> str:
        return f"<module {object.__getattribute__(self, '_name')!r}, imported on first use>"


@contextlib.contextmanager
def deferred_imports(*names: str) -> Iterator[None]:
    """Within the block, importing one of ``names`` that is installed and not yet imported gives a ``_Deferred``:
    the module is imported when something first uses it. After the block, imports are as usual.

    Ray's LLM config module imports ``transformers`` and, through its download utils, ``torch`` as it loads,
    for functions Serve's build task never calls (loading a model's Hugging Face config, downloading it).
    That was about 1.5 s of the 2.8 s build on the CPU machine (``tests/unit/test_engine_deployment.py``
    checks that neither runs)."""
    modules: dict[str, Any] = sys.modules
    placed = {}
    for name in names:
        if name not in modules and importlib.util.find_spec(name) is not None:
            placed[name] = modules[name] = _Deferred(name)
    try:
        yield
    finally:
        for name, stand_in in placed.items():
            if modules.get(name) is stand_in:
                del modules[name]


class EngineAppArgs(BaseModel):
    """The ``args`` of a rendered engine application."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The ArksApplication this app serves.")
    runtime: Literal["vllm", "sglang", "dynamo"] = "vllm"
    llm_config: dict[str, Any]
    dynamo: dict[str, Any] | None = None

    def ray_llm_config(self) -> Any:
        """``llm_config`` as Ray's ``LLMConfig``; a config Ray refuses is an error naming the app."""
        # ray.serve.llm's LLMConfig, from its own module: importing ray.serve.llm imports vLLM (seconds), which
        # Serve's build task does not need (deployments.engine_deployment); nor does it need torch.
        with deferred_imports("torch", "transformers"):
            from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

        try:
            return LLMConfig.model_validate(self.llm_config)
        except ValidationError as exc:
            raise ValueError(f"application {self.name}: invalid engine config: {exc}") from None


def build_app(raw: dict[str, Any]) -> Application:
    """Serve's entry point for an engine application; the runtime picks the engine server."""
    try:
        args = EngineAppArgs.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"application {raw.get('name', '?')}: invalid engine app args: {exc}") from None
    return fronted(_build_engine(args))


class EngineFront:
    """The ingress of an engine app whose engine has a custom request router, under Ray's HAProxy ingress.

    In that mode Ray refuses a custom router on an application's ingress deployment (HAProxy would bypass it), so
    the engine becomes this placeholder's child. No request passes through it: the gateway asks it once for the
    engine's deployment (``engine_deployment``), then calls that through the engine's own router. It holds no
    CPU."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def engine_deployment(self) -> str:
        """The name of the engine deployment behind this placeholder."""
        return str(self.engine.deployment_name)


def fronted(app: Application) -> Application:
    """``app``, behind an ``EngineFront`` when Ray's HAProxy ingress is on and its deployment has a custom
    request router (the check Ray's ``build_app`` makes); else ``app`` itself."""
    from ray import serve
    from ray.serve._private import constants

    if not constants.RAY_SERVE_ENABLE_HA_PROXY:
        return app
    # Ray's own reading of an Application (ray.serve._private.build_app._has_custom_request_router).
    if app._bound_deployment._deployment_config.request_router_config.is_default_request_router():
        return app
    front = serve.deployment(name=FRONT_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})(EngineFront)
    return front.bind(app)


def _build_engine(args: EngineAppArgs) -> Application:
    if args.runtime == "vllm":
        from deployments.vllm_engine import build_vllm

        return build_vllm(args)
    if args.runtime == "sglang":
        from deployments.sglang_engine import build_sglang

        return build_sglang(args)
    if args.runtime == "dynamo":
        from deployments.dynamo_apps import build_dynamo

        return build_dynamo(args)
    raise ValueError(
        f"application {args.name}: runtime {args.runtime!r} is not available in this build "
        "(supported here: vllm, sglang, dynamo)"
    )
