"""Which vLLM executor an engine gets (``arks_ray.engines.executor``), and what the engine deployment does
with the in-process one (``deployments.vllm_engine``): the replica actor takes the GPU, and the engine
config and node initialisation run in the replica with vLLM's ``uni`` executor.

Ray's own ``LLMServer.get_deployment_options`` and ``VLLMEngine`` run here; no engine and no Ray start (the
engine's own start and Ray's runtime context are replaced). That vLLM then runs on the GPU this way was
measured on an H200 (benchmarks/gpu_side_by_side.py, README's Performance section)."""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace
from typing import Any

import pytest

from arks_ray.api import load_documents
from arks_ray.engines.executor import EXECUTOR_KEY, choose_executor
from arks_ray.render import RenderOptions, render_namespace
from tests.support.keys import TEST_KEYS

GPU = {"bundles": [{"GPU": 1, "arks-group-a": 1}], "strategy": "STRICT_PACK"}
CPU = {"bundles": [{"CPU": 1, "arks-group-a": 1}], "strategy": "STRICT_PACK"}


def config(placement: dict[str, Any] = GPU, **engine_kwargs: Any) -> dict[str, Any]:
    return {"model_loading_config": {"model_id": "m", "model_source": "/models/m"},
            "engine_kwargs": {"enforce_eager": True, **engine_kwargs},
            "placement_group_config": copy.deepcopy(placement), "deployment_config": {"num_replicas": 1}}


@pytest.mark.parametrize(("placement", "kwargs", "executor", "backend"), [
    (GPU, {}, "uni", None),
    (GPU, {"distributed_executor_backend": "uni"}, "uni", None),
    (GPU, {"distributed_executor_backend": "ray"}, "ray", "ray"),
    (GPU, {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}, "uni", None),
    (CPU, {}, "ray", None),
    (CPU, {"distributed_executor_backend": "uni"}, "ray", None),
    ({"bundles": [{"GPU": 1}, {"GPU": 1}]}, {"tensor_parallel_size": 2}, "ray", None),
    ({"bundles": [{"GPU": 1}, {"GPU": 1}]}, {"pipeline_parallel_size": 2}, "ray", None),
    ({"bundles": [{"GPU": 2}]}, {}, "ray", None),
    ({"bundles": [{"GPU": 0.5}]}, {}, "ray", None),
])
def test_one_gpu_runs_in_process_unless_told(placement: dict[str, Any], kwargs: dict[str, Any], executor: str,
                                              backend: str | None) -> None:
    chosen = choose_executor(config(placement, **kwargs))
    assert chosen["experimental_configs"][EXECUTOR_KEY] == executor
    assert chosen["engine_kwargs"].get("distributed_executor_backend") == backend
    assert chosen["engine_kwargs"]["enforce_eager"] is True


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"distributed_executor_backend": "mp"}, r"'mp' is not supported: use 'uni' .* or 'ray'"),
    ({"distributed_executor_backend": "external_launcher"}, "not supported"),
    ({"distributed_executor_backend": "uni", "tensor_parallel_size": 2}, r"runs one worker, but TP x PP = 2"),
])
def test_an_executor_that_cannot_run_the_engine_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_executor(config(**kwargs))


def test_the_renderer_refuses_it_naming_the_field() -> None:
    model = {"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "m", "namespace": "ns"},
             "spec": {"model": "Qwen/Qwen2.5-7B-Instruct",
                      "storage": {"pvc": {"spec": {"accessModes": ["ReadWriteMany"],
                                                   "resources": {"requests": {"storage": "20Gi"}}}}}}}
    app = {"apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": "a", "namespace": "ns"},
           "spec": {"model": {"name": "m"}, "runtimeCommonArgs": ["--distributed-executor-backend mp"],
                    "instanceSpec": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
    loaded = load_documents([model, app])
    rendered = render_namespace(loaded.objects, "ns", options=RenderOptions(token_keys=TEST_KEYS))
    assert [(e.name, e.message) for e in rendered.errors if "executor" in e.message] == [
        ("a", "--distributed-executor-backend 'mp' is not supported: use 'uni' (one GPU, the default there) or 'ray'")]


def ray_llm_config(raw: dict[str, Any]) -> Any:
    from ray.serve.llm import LLMConfig

    return LLMConfig.model_validate(choose_executor(raw))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from arks_ray.local.tinymodel import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    # LLMServer.get_deployment_options reads the job's runtime_env, which would start Ray.
    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(runtime_env={}))


@pytest.mark.usefixtures("no_ray")
def test_the_in_process_replica_actor_holds_its_bundles_gpu() -> None:
    from deployments.vllm_engine import _llm_server_class

    options = _llm_server_class().get_deployment_options(ray_llm_config(config()))
    assert options["ray_actor_options"]["num_gpus"] == 1
    # one bundle: the replica actor's CPU and the GPU, which the actor now takes for its EngineCore child
    assert options["placement_group_bundles"] == [{"CPU": 1, "GPU": 1, "arks-group-a": 1}]


@pytest.mark.usefixtures("no_ray")
@pytest.mark.parametrize("raw", [config(distributed_executor_backend="ray"), config(CPU),
                                 config({"bundles": [{"GPU": 1}, {"GPU": 1}]}, tensor_parallel_size=2)])
def test_other_engines_keep_rays_options(raw: dict[str, Any]) -> None:
    from ray.serve.llm import LLMServer

    from deployments.vllm_engine import _llm_server_class

    cfg = ray_llm_config(raw)
    assert _llm_server_class().get_deployment_options(cfg) == LLMServer.get_deployment_options(cfg)
    assert "num_gpus" not in _llm_server_class().get_deployment_options(cfg)["ray_actor_options"]


def test_the_replica_starts_the_in_process_engine_only_when_chosen() -> None:
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    from deployments.vllm_engine import _llm_server_class

    cls = type("Server", (_llm_server_class(),), {"__del__": lambda self: None})
    chosen = cls.sync_init(ray_llm_config(config()))
    assert chosen._engine_cls.__name__ == "InProcessVLLMEngine"
    ray_default = cls.sync_init(ray_llm_config(config(distributed_executor_backend="ray")))
    assert ray_default._engine_cls is VLLMEngine
    assert issubclass(chosen._engine_cls, VLLMEngine)


def test_the_in_process_engine_initialises_the_node_here_and_builds_a_uni_config(
        monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Any) -> None:
    from ray.llm._internal.common.callbacks.base import CallbackBase, CallbackCtx
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from ray.llm._internal.serve.utils import node_initialization_utils

    from deployments.vllm_engine import _in_process_engine_class

    calls: list[Any] = []
    monkeypatch.setattr(node_initialization_utils, "initialize_remote_node", lambda cfg: calls.append(cfg))
    started: list[bool] = []

    async def ray_start(self: Any) -> None:  # Ray's start would check ctx.run_init_node, then build the engine
        started.append(self.llm_config.get_or_create_callback().ctx.run_init_node)

    monkeypatch.setattr(VLLMEngine, "start", ray_start)
    raw = config()
    raw["model_loading_config"]["model_source"] = str(tiny_model_dir)
    llm_config = ray_llm_config(raw)
    llm_config._callback_instance = CallbackBase(llm_config)
    llm_config._callback_instance.ctx = CallbackCtx()  # no placement group to create: Ray is not running
    engine = _in_process_engine_class()(llm_config)
    asyncio.run(engine.start())
    assert calls == [llm_config]  # the download ran here,
    assert started == [False]  # and Ray's node tasks will not

    engine_args, _, vllm_config = engine._prepare_engine_config(llm_config._callback_instance.ctx)
    assert engine_args.distributed_executor_backend == "uni"
    assert engine_args.model == str(tiny_model_dir)
    assert vllm_config.model_config.served_model_name == "m"


RAYS_START_ENGINE = '''
    async def _start_engine(self):
        if self.engine is None:
            raise ValueError("Engine is not set")
        await self.engine.start()
        push_telemetry_report_for_all_models(all_models=[self._llm_config])
        if RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING:
            record_extra_usage_tag(TagKey.LLM_SERVE_DIRECT_STREAMING_ENABLED, "1")
'''


def test_rays_engine_start_is_the_one_the_replica_mirrors() -> None:
    """``ArksLLMServer._start_engine`` is Ray's but for the usage report: a change in Ray's fails here."""
    import inspect

    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    code = [line for line in inspect.getsource(LLMServer._start_engine).splitlines()
            if line.strip() and not line.strip().startswith("#")]
    assert code == [line for line in RAYS_START_ENGINE.splitlines() if line]


class Engine:
    def __init__(self) -> None:
        self.started = False

    async def start(self) -> None:
        self.started = True


def server_with(monkeypatch: pytest.MonkeyPatch, usage_stats: str, push: Any) -> Any:
    """An ``ArksLLMServer`` with a stand-in engine, Ray's usage report being ``push``."""
    from ray.llm._internal.serve.observability.usage_telemetry import usage

    from deployments.vllm_engine import _llm_server_class

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", usage_stats)
    monkeypatch.setattr(usage, "push_telemetry_report_for_all_models", push)
    server = object.__new__(_llm_server_class())
    server.engine, server._llm_config = Engine(), "the config"
    return server


def test_the_usage_report_does_not_hold_up_the_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    returned = threading.Event()
    sent: list[Any] = []

    def push(all_models: list[Any]) -> None:  # Ray's gets or creates its actor, then waits on it
        sent.append((returned.wait(timeout=5), all_models))

    server = server_with(monkeypatch, "1", push)

    async def start() -> None:
        await server._start_engine()
        returned.set()
        await server._arks_usage_report

    asyncio.run(start())
    assert server.engine.started
    assert sent == [(True, ["the config"])]  # sent, after the replica was ready


def test_with_usage_stats_off_no_report_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []
    server = server_with(monkeypatch, "0", sent.append)
    asyncio.run(server._start_engine())
    assert server.engine.started
    assert server._arks_usage_report is None
    assert sent == []
