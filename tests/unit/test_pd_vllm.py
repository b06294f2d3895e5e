"""vLLM PD disaggregation up to the engine boundary: rendering, the Serve app, and one orchestrated request.

KV transfer needs GPUs and NIXL (or LMCache), so no vLLM engine runs here. What runs: the rendered
ArksDisaggregatedApplication, Ray's own ``PDServingArgs`` validation and builders as
``deployments.disaggregated.build_app`` calls them, and Ray's decode orchestrator (``PDDecodeServer``) in
our gateway-protocol subclass, with a stand-in engine and a stand-in prefill deployment handle. Ray is not
started (its LLMServer reads the driver's runtime env; the ``no_ray`` fixture hands it an empty one).
"""

from __future__ import annotations

import json
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from arks_ray.api.loading import load_documents
from arks_ray.engines.protocol import DONE, Chunk, EngineRequest, Failure, Final
from arks_ray.render import Rendered, render_namespace

MODEL = {"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "ds", "namespace": "default"},
         "spec": {"model": "deepseek-ai/DeepSeek-V2-Lite-Chat",
                  "storage": {"pvc": {"spec": {"accessModes": ["ReadWriteMany"],
                                               "resources": {"requests": {"storage": "64Gi"}}}}}}}
LMCACHE = """--kv-transfer-config '{"kv_connector": "LMCacheConnectorV1", "kv_connector_extra_config": {}}'"""


def pd_app(name: str = "pd", prefill_args: list[str] | None = None, decode_args: list[str] | None = None,
           **router: Any) -> dict[str, Any]:
    def side(replicas: int, gpus: int, args: list[str]) -> dict[str, Any]:
        return {"replicas": replicas, "runtimeCommonArgs": args,
                "instanceSpec": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}}

    return {"apiVersion": "arks.ai/v1", "kind": "ArksDisaggregatedApplication",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"runtime": "vllm", "model": {"name": "ds"}, "servedModelName": "ds-lite",
                     "router": {"replicas": 1, **router},
                     "prefill": side(2, 2, ["--tp 2", *(prefill_args or [])]),
                     "decode": side(1, 4, ["--tp 4", *(decode_args or [])])}}


def render(*apps: dict[str, Any]) -> Rendered:
    loaded = load_documents([MODEL, *apps])
    assert loaded.errors == [], loaded.errors
    return render_namespace(loaded.objects, "default")


def args_of(rendered: Rendered, name: str = "pd") -> dict[str, Any]:
    (found,) = [a for a in rendered.serve_config["applications"] if a["name"] == name]
    assert found["import_path"] == "deployments.disaggregated:build_app"
    args: dict[str, Any] = found["args"]
    return args


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(runtime_env={}))
    yield
    assert not ray.is_initialized()


# --- rendering -----------------------------------------------------------------------------------------


def test_both_sides_get_a_kv_connector_nixl_by_default() -> None:
    rendered = render(pd_app(decode_args=[LMCACHE]))
    assert rendered.problems == []
    args = args_of(rendered)
    assert args["runtime"] == "vllm"
    assert args["prefill"]["engine_kwargs"] == {
        "tensor_parallel_size": 2, "kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both"}}
    assert args["decode"]["engine_kwargs"] == {"tensor_parallel_size": 4, "kv_transfer_config": {
        "kv_role": "kv_both", "kv_connector": "LMCacheConnectorV1", "kv_connector_extra_config": {}}}
    assert args["prefill"]["deployment_config"] == {"num_replicas": 2}
    assert len(args["prefill"]["placement_group_config"]["bundles"]) == 2
    assert len(args["decode"]["placement_group_config"]["bundles"]) == 4


@pytest.mark.parametrize(("decode_args", "words"), [
    (["--kv-transfer-config NixlConnector"], "must be a JSON object"),
    (["""--kv-transfer-config '{"kv_role": "kv_both"}'"""], 'needs a "kv_connector" name'),
    (["--kv-transfer-config '{broken'"], "looks like JSON but does not parse"),
])
def test_a_bad_kv_connector_is_an_error_naming_the_app_and_side(decode_args: list[str], words: str) -> None:
    rendered = render(pd_app("bad", decode_args=decode_args), pd_app())
    (problem,) = rendered.errors
    assert (problem.kind, problem.name) == ("ArksDisaggregatedApplication", "bad")
    assert words in problem.message
    assert "decode" in str(problem)
    assert [a["name"] for a in rendered.serve_config["applications"]] == ["gateway", "pd"]


def test_arks_router_args_are_reported_unused_for_vllm() -> None:
    rendered = render(pd_app(routerArgs=["--policy", "cache_aware"]))
    (problem,) = rendered.problems
    assert (problem.path, problem.severity) == ("spec.router", "warning")
    assert "ignored for runtime vllm" in problem.message


# --- the Serve application -----------------------------------------------------------------------------


def test_build_app_wires_decode_to_prefill_as_build_pd_openai_app_does(no_ray: None) -> None:
    from ray.llm._internal.serve.serving_patterns.prefill_decode.pd_server import PDDecodeServer, PDPrefillServer
    from ray.serve.llm import LLMConfig

    from deployments.disaggregated import build_app

    args = args_of(render(pd_app()))
    decode = build_app(args)._bound_deployment
    assert decode.name == "Decode:ds-lite"
    assert issubclass(decode.func_or_class, PDDecodeServer)
    assert callable(decode.func_or_class.generate)  # the gateway protocol, on the app's ingress
    prefill = decode.init_kwargs["prefill_server"]._bound_deployment
    assert prefill.name == "Prefill:ds-lite"
    assert prefill.func_or_class is PDPrefillServer
    assert prefill._deployment_config.num_replicas == 2
    assert decode._deployment_config.num_replicas == 1
    group = args["decode"]["placement_group_config"]["bundles"][0]
    assert decode._replica_config.placement_group_bundles[0] == {**group, "CPU": 1}
    assert len(decode._replica_config.placement_group_bundles) == 4
    decode_config: LLMConfig = decode.init_kwargs["llm_config"]
    prefill_config: LLMConfig = prefill.init_kwargs["llm_config"]
    assert decode_config.model_id == prefill_config.model_id == "ds-lite"
    # Ray's PDServingArgs moves decode's NIXL side channel off prefill's ports, as in build_pd_openai_app.
    assert decode_config.experimental_configs["NIXL_SIDE_CHANNEL_PORT_BASE"] == 22000
    assert prefill_config.engine_kwargs["kv_transfer_config"]["kv_connector"] == "NixlConnector"


def test_build_app_refuses_a_side_without_kv_connector_naming_the_app(no_ray: None) -> None:
    from deployments.disaggregated import build_app

    args = args_of(render(pd_app()))
    del args["prefill"]["engine_kwargs"]["kv_transfer_config"]
    with pytest.raises(ValueError, match="application pd: invalid PD config") as err:
        build_app(args)
    assert "kv_transfer_config is required" in str(err.value)


# --- one request through Ray's orchestrator, to the engine boundary ------------------------------------


class FakeEngine:
    """The decode engine: records what it was asked, answers as vLLM frames a stream."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[str]:
        self.requests.append(request)
        for i, word in enumerate(["one", " two"]):
            chunk = {"id": "d", "object": "chat.completion.chunk", "model": request.model,
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": "length" if i else None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        usage = {"id": "d", "object": "chat.completion.chunk", "model": request.model, "choices": [],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        yield f"data: {json.dumps(usage)}\n\n"
        yield DONE


class FakePrefill:
    """The prefill deployment's handle: one whole response carrying the KV transfer parameters."""

    KV = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "prefill-0",
          "remote_block_ids": [4, 5], "remote_host": "10.0.0.7", "remote_port": 20001}

    def __init__(self, error: Any = None) -> None:
        self.requests: list[Any] = []
        self.error = error
        self.chat = types.SimpleNamespace(remote=self._remote)

    def _remote(self, request: Any, raw_request_info: Any) -> AsyncIterator[Any]:
        from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionResponse

        self.requests.append(request)

        async def answer() -> AsyncIterator[Any]:
            yield self.error or ChatCompletionResponse(
                id="p", model=request.model, kv_transfer_params=self.KV,
                choices=[{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}],
                usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
        return answer()


def decode_server(prefill: FakePrefill, monkeypatch: pytest.MonkeyPatch) -> Any:
    from deployments.disaggregated import build_app

    decode = build_app(args_of(render(pd_app())))._bound_deployment
    # The NIXL backend reads its side channel from the environment (Ray sets it per replica otherwise).
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "10.0.0.8")
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", "22000")
    config = decode.init_kwargs["llm_config"]
    server = decode.func_or_class.sync_init(config)
    config.setup_engine_backend()  # what the vLLM engine does when it starts
    server.engine = FakeEngine()
    server._prefill_handle = prefill
    return server


async def test_generate_prefills_remotely_then_decodes_with_the_transferred_kv(
        no_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill = FakePrefill()
    server = decode_server(prefill, monkeypatch)
    body = {"model": "ds-lite", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    items = [item async for item in server.generate(EngineRequest("chat", body))]

    (sent,) = prefill.requests
    assert (sent.max_tokens, sent.stream) == (1, False)
    assert sent.kv_transfer_params["do_remote_decode"] is True
    (decoded,) = server.engine.requests
    assert decoded.kv_transfer_params == FakePrefill.KV
    assert decoded.max_tokens == 8
    assert all(isinstance(i, Chunk) for i in items[:-1])
    text = "".join(i.text for i in items if isinstance(i, Chunk))
    assert '"content": "one"' in text
    assert text.endswith(DONE)
    assert '"usage"' not in text  # the client did not ask; the meter keeps it
    assert items[-1] == Final({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, 2)


async def test_a_prefill_error_becomes_the_requests_failure(no_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

    failure = ErrorResponse(error=ErrorInfo(message="prefill out of KV blocks on 10.0.0.7", type="ServiceUnavailable",
                                            code=503))
    server = decode_server(FakePrefill(error=failure), monkeypatch)
    body = {"model": "ds-lite", "messages": [{"role": "user", "content": "hi"}]}
    (item,) = [item async for item in server.generate(EngineRequest("chat", body))]
    # Unavailable (held against the backend, retried elsewhere, Retry-After); its text stays in the replica's log.
    assert item == Failure("unavailable", 503, "the engine cannot take this request right now")
    assert item.blames_backend
    assert server.engine.requests == []


async def test_a_prefill_refusing_the_input_is_the_clients_400(no_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

    refusal = ErrorResponse(error=ErrorInfo(message="This model's maximum context length is 4096 tokens",
                                            type="BadRequestError", code=400, param="messages"))
    server = decode_server(FakePrefill(error=refusal), monkeypatch)
    body = {"model": "ds-lite", "messages": [{"role": "user", "content": "hi"}]}
    (item,) = [item async for item in server.generate(EngineRequest("chat", body))]
    assert item == Failure("invalid", 400, "This model's maximum context length is 4096 tokens", "messages")
    assert not item.blames_backend
    assert server.engine.requests == []
