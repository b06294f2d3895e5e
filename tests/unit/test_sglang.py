"""SGLang (``runtime: sglang``) up to the engine boundary: args mapping, rendering, the Serve app, the typed port.

SGLang needs CUDA and is not installed here. What runs is everything of ours and Ray's around it: the
mapping of ``tensorParallelSize``/``runtimeCommonArgs`` to SGLang ``ServerArgs``, the rendered placement,
the Serve application built by ``deployments.engines.build_app`` (Ray's ``build_llm_deployment`` with
our ``SGLangServer`` subclass), and that server's real code driven against a stand-in for
``sglang.srt.ray.engine.RayEngine`` (the only SGLang object Ray's server touches).
"""

from __future__ import annotations

import sys
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from arks_ray.api.loading import load_documents
from arks_ray.engines.protocol import DONE, Answer, Chunk, EngineItem, EngineRequest, Failure, Final
from arks_ray.render import Rendered, render_namespace
from arks_ray.render.engine_args import ArgsError, sglang_server_args

MODEL = {"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "qwen", "namespace": "default"},
         "spec": {"model": "Qwen/Qwen2.5-72B-Instruct",
                  "storage": {"pvc": {"spec": {"accessModes": ["ReadWriteMany"],
                                               "resources": {"requests": {"storage": "200Gi"}}}}}}}


def sglang_app(name: str = "sg", gpus: int = 8, **spec: Any) -> dict[str, Any]:
    inst = {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}, **spec.pop("instanceSpec", {})}
    return {"apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": name, "namespace": "default"},
            "spec": {"runtime": "sglang", "model": {"name": "qwen"}, "servedModelName": "qwen-72b",
                     "instanceSpec": inst, **spec}}


@pytest.fixture(autouse=True)
def ray_stays_down() -> Iterator[None]:
    """Building SGLang's deployment must not start Ray (SGLangServer's options read no runtime context)."""
    import ray

    yield
    assert not ray.is_initialized()


def render(*apps: dict[str, Any]) -> Rendered:
    loaded = load_documents([MODEL, *apps])
    assert loaded.errors == [], loaded.errors
    return render_namespace(loaded.objects, "default")


def engine_app(rendered: Rendered, name: str = "sg") -> dict[str, Any]:
    (found,) = [a for a in rendered.serve_config["applications"] if a["name"] == name]
    return found


# --- runtimeCommonArgs -> ServerArgs -------------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["--mem-fraction-static 0.85", "--context-length=32768"], {"mem_fraction_static": 0.85, "context_length": 32768}),
    (["--dp 2"], {"dp_size": 2}),
    (["--data-parallel-size", "2", "--ep", "4"], {"dp_size": 2, "ep_size": 4}),
    (["--expert-parallel-size 8 --enable-dp-attention"], {"ep_size": 8, "enable_dp_attention": True}),
    (["--decode-context-parallel-size 2"], {"dcp_size": 2}),
    (["--disaggregation-transfer-backend mooncake", "--chunked-prefill-size 8192"],
     {"disaggregation_transfer_backend": "mooncake", "chunked_prefill_size": 8192}),
    (["""--json-model-override-args '{"rope_scaling": {"factor": 2}}'"""],
     {"json_model_override_args": {"rope_scaling": {"factor": 2}}}),
    (["--trust-remote-code", "--disable-radix-cache"], {"trust_remote_code": True, "disable_radix_cache": True}),
])
def test_server_args_use_sglang_field_names(args: list[str], expected: dict[str, Any]) -> None:
    assert sglang_server_args(args) == expected


@pytest.mark.parametrize(("args", "words"), [
    (["--tp 2"], "--tp is set by spec.tensorParallelSize"),
    (["--tensor-parallel-size 2"], "spec.tensorParallelSize"),
    (["--pp 2"], "spec.pipelineParallelSize"),
    (["--model-path /x"], "spec.model"),
    (["--model /x"], "spec.model"),
    (["--nnodes 2"], "spec.size"),
    (["--dist-init-addr 10.0.0.1:5000"], "placement group"),
    (["--port 30000"], "the gateway"),
    (["--dp 2 --dp-size 2"], "--dp and --dp-size both set SGLang's dp_size"),
    (["--mem-fraction-static 0.8; rm -rf /"], "shell syntax"),
    (["--json-model-override-args {bad json}"], "looks like JSON but does not parse"),
    (["mem-fraction-static 0.8"], "expected a --flag"),
    (["--chat-template 'unclosed"], "cannot split"),
])
def test_unusable_args_are_refused_with_a_reason(args: list[str], words: str) -> None:
    with pytest.raises(ArgsError) as err:
        sglang_server_args(args)
    assert words in str(err.value)


def test_unparseable_args_are_a_problem_naming_the_app() -> None:
    rendered = render(sglang_app("broken", runtimeCommonArgs=["--mem-fraction-static", "{0.8"]), sglang_app())
    (problem,) = rendered.errors
    assert (problem.kind, problem.name, problem.path) == ("ArksApplication", "broken", "spec.runtimeCommonArgs")
    assert "does not parse" in problem.message
    assert "broken" in str(problem)
    assert [a["name"] for a in rendered.serve_config["applications"]] == ["gateway", "sg"]


# --- rendering -----------------------------------------------------------------------------------------


def test_multi_node_sglang_renders_server_args_and_one_bundle_per_pod() -> None:
    rendered = render(sglang_app(size=2, tensorParallelSize=16, accelerator="H100",
                                 runtimeCommonArgs=["--mem-fraction-static 0.85", "--dp 1"]))
    assert rendered.problems == []
    llm = engine_app(rendered)["args"]["llm_config"]
    (group,) = rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resource = "arks-wg-" + group["groupName"]
    assert llm["engine_kwargs"] == {
        "mem_fraction_static": 0.85, "dp_size": 1, "tp_size": 16, "nnodes": 2,
        "model_path": "/models/models/default/qwen", "served_model_name": "qwen-72b"}
    # SGLang's RayEngine starts a node's ranks in that node's bundle; Serve's replica actor needs bundle 0's CPU.
    assert llm["placement_group_config"] == {
        "placement_group_bundles": [{resource: 1, "GPU": 8, "CPU": 1.0}, {resource: 1, "GPU": 8}],
        "placement_group_strategy": "STRICT_SPREAD"}
    assert (llm["accelerator_type"], llm["accelerator_config"]) == ("H100", {"kind": "gpu"})
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 2)


def test_single_pod_sglang_is_one_strict_pack_bundle_with_pp() -> None:
    rendered = render(sglang_app(gpus=4, tensorParallelSize=2, pipelineParallelSize=2))
    llm = engine_app(rendered)["args"]["llm_config"]
    assert llm["engine_kwargs"]["tp_size"] == 2
    assert llm["engine_kwargs"]["pp_size"] == 2
    assert "nnodes" not in llm["engine_kwargs"]
    (bundle,) = llm["placement_group_config"]["placement_group_bundles"]
    assert (bundle["GPU"], bundle["CPU"]) == (4, 1.0)
    assert llm["placement_group_config"]["placement_group_strategy"] == "STRICT_PACK"


def test_ranks_that_do_not_divide_over_the_pods_are_an_error() -> None:
    rendered = render(sglang_app(size=3, tensorParallelSize=4))
    (problem,) = rendered.errors
    assert (problem.name, problem.path) == ("sg", "spec.size")
    assert "not a multiple of 3" in problem.message
    assert [a["name"] for a in rendered.serve_config["applications"]] == ["gateway"]


# --- the Serve application -----------------------------------------------------------------------------


def built(rendered: Rendered, name: str = "sg") -> Any:
    from deployments.engines import build_app

    return build_app(engine_app(rendered, name)["args"])._bound_deployment


def test_build_app_makes_an_sglang_server_deployment_with_the_rendered_placement() -> None:
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # ray.serve.llm's, less its subclass
    from ray.llm._internal.serve.engines.sglang import SGLangServer

    rendered = render(sglang_app(size=2, tensorParallelSize=16, accelerator="H100"))
    deployment = built(rendered)
    assert issubclass(deployment.func_or_class, SGLangServer)
    assert deployment.name == "arks-engine:qwen-72b"
    replica = deployment._replica_config
    llm = engine_app(rendered)["args"]["llm_config"]
    assert replica.placement_group_bundles == llm["placement_group_config"]["placement_group_bundles"]
    assert replica.placement_group_strategy == "STRICT_SPREAD"
    assert replica.ray_actor_options["num_cpus"] == 1  # fits bundle 0
    assert deployment._deployment_config.num_replicas == 1
    config = deployment.init_kwargs["llm_config"]
    assert isinstance(config, LLMConfig)
    assert config.engine_kwargs["model_path"] == "/models/models/default/qwen"
    assert config.accelerator_type == "H100"


def test_build_app_refuses_an_engine_config_without_a_model_path() -> None:
    from deployments.engines import build_app

    args = engine_app(render(sglang_app()))["args"]
    del args["llm_config"]["engine_kwargs"]["model_path"]
    with pytest.raises(ValueError, match="application sg: engine_kwargs has no model_path"):
        build_app(args)


# --- the gateway protocol, against a stand-in for SGLang's RayEngine ---------------------------------


class FakeRayEngine:
    """What Ray's SGLangServer calls on ``sglang.srt.ray.engine.RayEngine``: chat template, generate, encode."""

    created: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        FakeRayEngine.created.append(kwargs)
        self.calls: list[dict[str, Any]] = []
        self.tokenizer_manager = types.SimpleNamespace(tokenizer=types.SimpleNamespace(
            apply_chat_template=lambda messages, **kw: "|".join(f"{m['role']}:{m['content']}" for m in messages)))

    async def async_generate(self, prompt: Any, stream: bool, sampling_params: dict[str, Any] | None = None) -> Any:
        self.calls.append({"prompt": prompt, "stream": stream, "sampling_params": sampling_params})
        words = ["one", " two", " three"][: (sampling_params or {}).get("max_new_tokens", 3)]
        if not stream:
            def one(p: str) -> dict[str, Any]:
                return {"text": "".join(words), "meta_info": {
                    "id": "gen-1", "prompt_tokens": len(p.split()), "completion_tokens": len(words),
                    "finish_reason": {"type": "length"}}}
            return [one(p) for p in prompt] if isinstance(prompt, list) else one(prompt)

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            for i in range(len(words)):
                last = i == len(words) - 1
                yield {"text": "".join(words[: i + 1]),
                       "meta_info": {"finish_reason": {"type": "length"} if last else None}}
        return chunks()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = types.ModuleType("sglang.srt.ray.engine")
    module.RayEngine = FakeRayEngine  # type: ignore[attr-defined]
    for name in ("sglang", "sglang.srt", "sglang.srt.ray"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.ray.engine", module)
    FakeRayEngine.created.clear()
    deployment = built(render(sglang_app(tensorParallelSize=2, runtimeCommonArgs=["--mem-fraction-static 0.7"])))
    return deployment.func_or_class(**deployment.init_kwargs)


async def collect(stream: AsyncIterator[EngineItem]) -> list[EngineItem]:
    return [item async for item in stream]


def generate(server: Any, kind: str, body: dict[str, Any], client_usage: bool = False) -> AsyncIterator[EngineItem]:
    return server.generate(EngineRequest(kind, body, client_usage))


def test_the_engine_gets_exactly_the_rendered_server_args(server: Any) -> None:
    (kwargs,) = FakeRayEngine.created
    assert kwargs == {"mem_fraction_static": 0.7, "tp_size": 2, "model_path": "/models/models/default/qwen",
                      "served_model_name": "qwen-72b", "enable_metrics": True}


async def test_chat_whole_response_carries_sglangs_usage(server: Any) -> None:
    body = {"model": "qwen-72b", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
    (item,) = await collect(generate(server, "chat", body))
    assert isinstance(item, Answer)
    assert item.status == 200
    assert item.body["choices"][0]["message"]["content"] == "one two"
    assert item.body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert server.engine.calls[0]["prompt"] == "user:hello there"
    assert server.engine.calls[0]["sampling_params"] == {"max_new_tokens": 2}


async def test_chat_stream_is_framed_ends_with_done_and_counts_chunks(server: Any) -> None:
    body = {"model": "qwen-72b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    items = await collect(generate(server, "chat", body, client_usage=True))
    chunks, final = items[:-1], items[-1]
    assert all(isinstance(c, Chunk) for c in chunks)
    texts = [c.text for c in chunks if isinstance(c, Chunk)]
    assert texts[-1] == DONE
    events = "".join(texts).split("\n\n")
    assert [e[:7] for e in events if e] == ["data: {"] * 3 + ["data: ["]
    assert '"role": "assistant"' in events[0]
    # Ray's SGLang stream has no usage chunk: the final usage is the chunk count, the gateway adds the prompt.
    assert final == Final(None, 3)


async def test_completions_batch_and_stream(server: Any) -> None:
    (whole,) = await collect(generate(server, "completions", {"model": "qwen-72b", "prompt": ["a b", "c"]}))
    assert isinstance(whole, Answer)
    assert [c["text"] for c in whole.body["choices"]] == ["one two three"] * 2
    assert whole.body["usage"]["prompt_tokens"] == 3
    items = await collect(generate(server, "completions", {"model": "qwen-72b", "prompt": "a", "stream": True,
                                                           "max_tokens": 1}))
    assert items[-2:] == [Chunk(DONE), Final(None, 1)]


@pytest.mark.parametrize(("kind", "body", "status", "words"), [
    ("chat", {"model": "qwen-72b", "messages": "not a list"}, 400, "messages"),
    ("chat", {"model": "qwen-72b", "messages": [], "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": "qwen-72b", "prompt": []}, 400, "cannot be empty"),
    ("tokenize", {"model": "qwen-72b", "prompt": "a"}, 404, "does not serve /v1/tokenize"),
])
async def test_client_mistakes_are_the_clients_failures(server: Any, kind: str, body: dict[str, Any], status: int,
                                                       words: str) -> None:
    (item,) = await collect(generate(server, kind, body))
    assert isinstance(item, Failure)
    assert (item.kind, item.status, item.blames_backend) == ("invalid", status, False)
    assert words in item.message
    assert item.body()["error"]["type"] == "invalid_request_error"
    assert server.engine.calls == []


@pytest.mark.parametrize(("exc", "kind", "status"), [
    (ValueError("prompt is longer than the context window of 4096 tokens"), "invalid", 400),
    (RuntimeError("NCCL error at 10.0.0.4: unhandled system error"), "engine", 500),
])
async def test_an_engine_exception_before_any_output_is_classified(server: Any, monkeypatch: pytest.MonkeyPatch,
                                                                   exc: Exception, kind: str, status: int) -> None:
    async def fails(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(server.engine, "async_generate", fails)
    body = {"model": "qwen-72b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    (item,) = await collect(generate(server, "chat", body))
    assert isinstance(item, Failure)
    assert (item.kind, item.status) == (kind, status)
    assert "10.0.0.4" not in item.message  # an engine's own failure is described, not echoed
    if kind == "invalid":
        assert "context window" in item.message


async def test_an_engine_that_breaks_mid_stream_fails_after_what_it_sent(server: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async def breaks(prompt: Any, stream: bool, sampling_params: Any = None) -> Any:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            yield {"text": "one", "meta_info": {"finish_reason": None}}
            raise ValueError("detokenizer state corrupted")
        return chunks()

    monkeypatch.setattr(server.engine, "async_generate", breaks)
    body = {"model": "qwen-72b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    items = await collect(generate(server, "chat", body))
    assert len(items) > 1
    assert all(isinstance(i, Chunk) for i in items[:-1])
    # After output, even a ValueError is the engine breaking, not the client's mistake.
    assert items[-1] == Failure("engine", 500, "the engine failed mid-stream")
