"""vLLM's own server as an app's frontend (``spec.engineFrontend: vllmServer``), short of running it: the
command line (``arks_ray.engines.vllm_server``) against vLLM's own argument parser, the scheduler gauges off
a Prometheus page, what the render accepts and refuses, and the deployment Ray's builder makes of it. The
server itself runs in ``tests/e2e/test_vllm_server_frontend.py``.
"""

from __future__ import annotations

import copy
import pickle
import shlex
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from arks_ray.api import load_documents
from arks_ray.engines.vllm_server import (
    FRONTEND_KEY,
    KEEP_ALIVE_ENV,
    KEEP_ALIVE_S,
    VLLM_SERVER,
    cli_words,
    keep_alive_s,
    scheduler_gauges,
    server_spec,
)
from arks_ray.render import RenderOptions, render_namespace
from arks_ray.render.engine_args import parse_engine_args
from tests.support.keys import TEST_KEYS


@pytest.mark.parametrize("args", [
    ["--dtype bfloat16", "--max-model-len 2048", "--enforce-eager", "--gpu-memory-utilization 0.9"],
    ["--no-enable-prefix-caching", "--kv-cache-dtype fp8", "--swap-space 4"],
    ["--override-generation-config '{\"temperature\": 0.5}'", "--max-num-seqs 256"],
])
def test_the_command_line_says_what_the_render_parsed(args: list[str]) -> None:
    kwargs = parse_engine_args(args)
    assert parse_engine_args([shlex.join(cli_words(kwargs))]) == kwargs  # argv words, as a shell would give them


def test_vllms_own_parser_reads_the_command_line() -> None:
    """The server's argv, parsed by the vLLM installed here, gives the engine arguments the render made."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # vLLM before 0.30
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[no-redef]

    kwargs = parse_engine_args(["--dtype bfloat16", "--max-model-len 2048", "--enforce-eager",
                                "--no-enable-prefix-caching", "--override-generation-config '{\"temperature\": 0.5}'",
                                "--gpu-memory-utilization 0.5", "--distributed-executor-backend ray"])
    kwargs["tensor_parallel_size"] = 1
    spec = server_spec("python", 8123, "/models/m", "served", kwargs)
    assert spec.argv[:3] == ("python", "-m", "vllm.entrypoints.openai.api_server")
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(list(spec.argv[3:]))
    assert (ns.model, ns.served_model_name, ns.host, ns.port) == ("/models/m", ["served"], "127.0.0.1", 8123)
    assert (ns.dtype, ns.max_model_len, ns.enforce_eager, ns.enable_prefix_caching) == ("bfloat16", 2048, True, False)
    assert ns.override_generation_config == {"temperature": 0.5}
    assert ns.gpu_memory_utilization == 0.5
    assert ns.tensor_parallel_size == 1
    assert ns.distributed_executor_backend is None  # Ray's frontend needs it; the server picks its own


PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} NaN
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 9.0
vllm:kv_cache_usage_perc{engine="0",model_name="a } b"} 0.25 1700000000000
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:prompt_tokens_total{engine="0",model_name="m"} 12.0
"""


def test_the_scheduler_gauges_are_read_off_the_page() -> None:
    assert scheduler_gauges(PAGE) == {"running": 5.0, "waiting": 1.0, "kv_cache_usage": 0.5}
    assert scheduler_gauges("") == {}
    assert scheduler_gauges("vllm:num_requests_running{engine=\"0\"} not-a-number\n") == {}


MODEL = {"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "m", "namespace": "ns"},
         "spec": {"model": "Qwen/Qwen2.5-7B-Instruct",
                  "storage": {"pvc": {"spec": {"accessModes": ["ReadWriteMany"],
                                               "resources": {"requests": {"storage": "20Gi"}}}}}}}


def app(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"model": {"name": "m"}, "engineFrontend": VLLM_SERVER, "runtimeCommonArgs": ["--enforce-eager"],
                     "instanceSpec": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}, **spec}}


def render(application: dict[str, Any]) -> Any:
    loaded = load_documents([MODEL, application])
    return render_namespace(loaded.objects, "ns", options=RenderOptions(token_keys=TEST_KEYS))


def engine_args(rendered: Any) -> dict[str, Any]:
    (engine,) = [a for a in rendered.serve_config["applications"] if a["name"] == "a"]
    return dict(engine["args"])


def test_the_render_carries_the_frontend_into_the_engine_app() -> None:
    rendered = render(app())
    assert rendered.errors == []
    llm_config = engine_args(rendered)["llm_config"]
    assert llm_config["experimental_configs"] == {FRONTEND_KEY: VLLM_SERVER}
    assert "experimental_configs" not in engine_args(render(app(engineFrontend="rayLLM")))["llm_config"]
    assert "experimental_configs" not in engine_args(render(app(engineFrontend=None)))["llm_config"]


@pytest.mark.parametrize(("spec", "message"), [
    ({"tensorParallelSize": 2, "instanceSpec": {"resources": {"limits": {"nvidia.com/gpu": "2"}}}},
     "runs one engine worker per replica, not 2"),
    ({"runtime": "sglang"}, "is for runtime vllm, not sglang"),
    ({"lora": {"adapters": [{"name": "x", "model": {"name": "m"}}]}}, "does not serve LoRA adapters yet"),
])
def test_the_render_refuses_what_the_server_cannot_run(spec: dict[str, Any], message: str) -> None:
    rendered = render(app(**spec))
    assert [e.name for e in rendered.errors if message in e.message] == ["a"], rendered.errors


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    # LLMServer.get_deployment_options reads the job's runtime_env, which would start Ray.
    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(runtime_env={}))


LLM_CONFIG = {"model_loading_config": {"model_id": "m", "model_source": "/models/m"},
              "engine_kwargs": {"enforce_eager": True, "tensor_parallel_size": 1},
              "placement_group_config": {"bundles": [{"GPU": 1, "arks-group-a": 1}], "strategy": "STRICT_PACK"},
              "deployment_config": {"num_replicas": 2, "max_ongoing_requests": 64},
              "experimental_configs": {FRONTEND_KEY: VLLM_SERVER}}


@pytest.mark.usefixtures("no_ray")
def test_the_deployment_is_placed_as_rays_frontend_would_be() -> None:
    from deployments.engines import build_app
    from deployments.vllm_server import ServerConfig

    server = build_app({"name": "a", "runtime": "vllm", "llm_config": copy.deepcopy(LLM_CONFIG)})
    rayllm = copy.deepcopy(LLM_CONFIG)
    del rayllm["experimental_configs"]
    theirs = build_app({"name": "a", "runtime": "vllm", "llm_config": rayllm})
    ours, rays = server._bound_deployment, theirs._bound_deployment
    assert ours.func_or_class == "deployments.vllm_server.VLLMServerReplica"  # the replica imports it
    assert ours.name == rays.name == "arks-engine:m"
    # The replica gets a config of its own: unpickling Ray's LLMConfig would import torch before it starts.
    assert not ours.init_kwargs
    (config,) = ours.init_args
    assert isinstance(config, ServerConfig)
    assert (config.app, config.model, config.served_name) == ("a", "/models/m", "m")
    assert config.engine_kwargs["enforce_eager"] is True
    assert config.deployment_config["num_replicas"] == 2
    unpickled = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
         "print(sorted(m for m in ('torch', 'vllm', 'ray.llm') if m in sys.modules))"],
        input=pickle.dumps(config), capture_output=True, check=True)
    assert unpickled.stdout.decode().strip() == "[]"
    # Everything Serve places and routes by is the same: replicas, limits, health checks, router, placement.
    assert ours._deployment_config == rays._deployment_config
    assert ours._replica_config.placement_group_bundles == rays._replica_config.placement_group_bundles
    assert ours._replica_config.placement_group_strategy == rays._replica_config.placement_group_strategy == \
        "STRICT_PACK"
    assert ours.ray_actor_options == rays.ray_actor_options
    assert ours.ray_actor_options["num_gpus"] == 1  # the server, the replica's child, sees its GPU


@pytest.mark.usefixtures("no_ray")
def test_the_build_refuses_lora_too() -> None:
    from deployments.engines import build_app

    raw = copy.deepcopy(LLM_CONFIG)
    raw["lora_config"] = {"max_num_adapters_per_replica": 2}
    with pytest.raises(ValueError, match="application a: engineFrontend vllmServer does not serve LoRA"):
        build_app({"name": "a", "runtime": "vllm", "llm_config": raw})


def test_the_servers_keep_alive_is_whole_seconds_or_refused_naming_the_variable() -> None:
    assert keep_alive_s({}) == KEEP_ALIVE_S
    assert keep_alive_s({KEEP_ALIVE_ENV: " 90 "}) == 90
    for bad in ("1.5", "soon", "", "0", "-3"):
        with pytest.raises(ValueError, match=rf"^{KEEP_ALIVE_ENV} must be a whole number of seconds, at least 1 "):
            keep_alive_s({KEEP_ALIVE_ENV: bad})
