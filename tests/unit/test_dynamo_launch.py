"""Dynamo launch specs (``arks_ray.engines.dynamo``) and the Dynamo parts of the renderer.

The flag names were checked against ``python -m dynamo.<engine> --help`` of ai-dynamo 1.6.1; the e2e
suite runs the mocker's and the frontend's command lines for real.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from arks_ray.api.loading import load_yaml
from arks_ray.engines import dynamo
from arks_ray.engines.dynamo import Cluster, LaunchError, LaunchSpec
from arks_ray.render import RenderOptions, render_namespace
from deployments.upstream import error_message

PY = "/opt/dynamo/bin/python"
LOCAL = Cluster(discovery="file", request_plane="tcp", namespace="arks-default-app", file_dir="/state/kv")


def worker(engine: str, mode: str = "agg", args: tuple[str, ...] = ()) -> list[str]:
    return list(dynamo.worker_spec(PY, engine, "/models/m", "served", LOCAL, mode=mode, args=args).argv)


def test_frontend_listens_on_loopback_with_file_discovery() -> None:
    spec = dynamo.frontend_spec(PY, 18000, LOCAL)
    assert spec.role == "frontend"
    assert list(spec.argv) == [PY, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", "18000",
                               "--discovery-backend", "file", "--request-plane", "tcp"]
    assert spec.env == {"DYN_NAMESPACE": "arks-default-app", "DYN_FILE_KV": "/state/kv"}


def test_frontend_takes_router_args_but_not_the_ones_it_owns() -> None:
    spec = dynamo.frontend_spec(PY, 1, LOCAL, ["--router-mode kv"])
    assert spec.argv[-2:] == ("--router-mode", "kv")
    with pytest.raises(LaunchError, match=r"router.routerArgs: --http-port is set by the sidecar supervisor"):
        dynamo.frontend_spec(PY, 1, LOCAL, ["--http-port=9"])


@pytest.mark.parametrize(("engine", "head"), [
    ("mocker", ["--model-path", "/models/m", "--model-name", "served"]),
    ("vllm", ["--model", "/models/m", "--served-model-name", "served"]),
    ("sglang", ["--model-path", "/models/m", "--served-model-name", "served"]),
    ("trtllm", ["--model", "/models/m", "--served-model-name", "served"]),
])
def test_each_engine_gets_the_model_in_its_own_flags(engine: str, head: list[str]) -> None:
    assert worker(engine) == [PY, "-m", f"dynamo.{engine}", *head,
                              "--discovery-backend", "file", "--request-plane", "tcp"]


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_pd_roles_set_the_disaggregation_mode(mode: str) -> None:
    argv = worker("mocker", mode)
    assert argv[argv.index("--disaggregation-mode") + 1] == mode
    assert dynamo.worker_spec(PY, "mocker", "/m", "s", LOCAL, mode=mode).role == mode


def test_vllm_pd_gets_nixl_unless_a_connector_is_given() -> None:
    argv = worker("vllm", "prefill")
    assert argv[argv.index("--kv-transfer-config") + 1] == dynamo.VLLM_PD_KV_TRANSFER
    lmcache = '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'
    # Shell words, as in Arks: JSON keeps its quotes inside single quotes.
    own = worker("vllm", "decode", (f"--kv-transfer-config '{lmcache}'",))
    assert own.count("--kv-transfer-config") == 1
    assert own[own.index("--kv-transfer-config") + 1] == lmcache
    assert "--kv-transfer-config" not in worker("vllm")
    assert "--kv-transfer-config" not in worker("sglang", "prefill")


@pytest.mark.parametrize(("engine", "flag"), [("vllm", "--tensor-parallel-size"), ("sglang", "--tp-size"),
                                              ("trtllm", "--tensor-parallel-size")])
@pytest.mark.parametrize("given", ["--tp 2", "--tp-size=2", "--tensor-parallel-size 2"])
def test_tp_in_any_spelling_becomes_the_engines_own(engine: str, flag: str, given: str) -> None:
    argv = worker(engine, args=(given, "--max-model-len 4096"))
    assert argv[argv.index(flag) + 1] == "2"
    assert sum(a.startswith(("--tp", "--tensor")) for a in argv) == 1
    assert argv[-2:] == ["--max-model-len", "4096"]


def test_pp_is_mapped_too_and_conflicting_spellings_are_refused() -> None:
    argv = worker("sglang", args=("--pipeline-parallel-size 2",))
    assert argv[argv.index("--pp-size") + 1] == "2"
    with pytest.raises(LaunchError, match="--tp and --tensor-parallel-size set the same thing"):
        worker("vllm", args=("--tp 2 --tensor-parallel-size 2",))
    with pytest.raises(LaunchError, match="positive integer"):
        worker("vllm", args=("--tp zero",))
    with pytest.raises(LaunchError, match="needs a value"):
        worker("vllm", args=("--tp",))


def test_the_mocker_has_no_parallelism_to_set() -> None:
    assert "--tp" not in worker("mocker", args=("--tp 1",))
    with pytest.raises(LaunchError, match="mocker engine has no tensor parallelism"):
        worker("mocker", args=("--tp 2",))


@pytest.mark.parametrize(("arg", "owner"), [
    ("--model-path /x", "the ArksModel"), ("--served-model-name x", "servedModelName"),
    ("--disaggregation-mode=prefill", "the prefill/decode role"), ("--discovery-backend etcd", "arks-ray"),
    ("--namespace other", "one Dynamo namespace per app"),
])
def test_worker_args_cannot_override_what_the_spec_owns(arg: str, owner: str) -> None:
    flag = arg.split()[0].split("=")[0]
    with pytest.raises(LaunchError, match=re.escape(f"dynamo.args: {flag} is set by ") + ".*" + re.escape(owner)):
        worker("vllm", args=(arg,))


def test_args_are_split_like_arks_but_never_through_a_shell() -> None:
    assert worker("mocker", args=("--speedup-ratio 10", "--block-size", "16"))[-4:] == [
        "--speedup-ratio", "10", "--block-size", "16"]
    with pytest.raises(LaunchError, match="shell syntax"):
        worker("mocker", args=("--speedup-ratio $(id)",))
    with pytest.raises(LaunchError, match="cannot split"):
        worker("mocker", args=('--x "unterminated',))


def test_unknown_engine_and_mode_are_refused() -> None:
    with pytest.raises(LaunchError, match="'tgi' is not one of vllm, sglang, trtllm, mocker"):
        worker("tgi")
    with pytest.raises(LaunchError, match="mode 'encode'"):
        worker("vllm", "encode")


def test_discovery_comes_from_the_pod_environment() -> None:
    assert dynamo.cluster_from_env({}, "ns", "/d") == Cluster("file", "tcp", "ns", "/d")
    etcd = dynamo.cluster_from_env({"ETCD_ENDPOINTS": "http://etcd:2379", "NATS_SERVER": "nats://n:4222"}, "ns", "/d")
    assert etcd == Cluster("etcd", "tcp", "ns", None)
    assert dynamo.frontend_spec(PY, 1, etcd).env == {"DYN_NAMESPACE": "ns"}
    chosen = dynamo.cluster_from_env({"DYN_DISCOVERY_BACKEND": "kubernetes", "DYN_REQUEST_PLANE": "nats"}, "ns", "/d")
    assert (chosen.discovery, chosen.request_plane) == ("kubernetes", "nats")
    with pytest.raises(LaunchError, match="DYN_REQUEST_PLANE='http'"):
        dynamo.cluster_from_env({"DYN_REQUEST_PLANE": "http"}, "ns", "/d")


def test_namespace_is_per_app_in_dynamos_alphabet() -> None:
    assert dynamo.dynamo_namespace("team-a", "My.App") == "arks-team-a-my-app"
    assert dynamo.dynamo_namespace("a", "b") != dynamo.dynamo_namespace("b", "a")


def test_sidecar_environment_drops_the_replicas_python() -> None:
    spec = LaunchSpec("worker", ("x",), {"DYN_NAMESPACE": "n"})
    env = dynamo.sidecar_environ({"PYTHONPATH": "/ray/site", "VIRTUAL_ENV": "/venv", "CUDA_VISIBLE_DEVICES": "0,1",
                                  "ETCD_ENDPOINTS": "e"}, spec)
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1", "ETCD_ENDPOINTS": "e", "DYN_NAMESPACE": "n"}


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"message":"Model not found","type":"Not Found","code":404}', ("Model not found", None)),
    (b'{"error":{"message":"bad","param":"messages"}}', ("bad", "messages")),
    (b'{"error":"no such model"}', ("no such model", None)),
    (b'{"error":{"param":"n"}}', ("HTTP 500", "n")),
    (b"plain text", ("plain text", None)),
    (b"[1, 2]", ("[1, 2]", None)),
    (b"", ("HTTP 500", None)),
    (b'{"message":"' + b"x" * 600 + b'"}', ("x" * 500, None)),
])
def test_frontend_errors_are_read_in_both_shapes(raw: bytes, expected: tuple[str, str | None]) -> None:
    assert error_message(500, raw) == expected


MODEL = """
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {name: m, namespace: default}
spec: {model: org/m, source: {local: {path: /models/m}}}
"""


def render(doc: str) -> Any:
    loaded = load_yaml(MODEL + "---\n" + doc)
    assert not loaded.errors, loaded.errors
    return render_namespace(loaded.objects, "default", options=RenderOptions(local=True))


def serve_app(rendered: Any, name: str) -> dict[str, Any]:
    app: dict[str, Any] = next(a for a in rendered.serve_config["applications"] if a["name"] == name)
    return app


def test_render_passes_worker_args_and_namespace_to_the_dynamo_app() -> None:
    rendered = render("""
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {name: agg, namespace: default}
spec:
  runtime: dynamo
  model: {name: m}
  runtimeCommonArgs: ["--max-model-len 4096"]
  dynamo: {engine: sglang, args: ["--tp 2"]}
  instanceSpec: {}
""")
    assert not rendered.errors
    args = serve_app(rendered, "agg")["args"]
    assert args["dynamo"] == {"engine": "sglang", "args": ["--max-model-len 4096", "--tp 2"],
                              "namespace": "arks-default-agg"}
    assert args["llm_config"]["placement_group_config"]["bundles"][0]["CPU"] == 1.0


def test_render_reports_bad_dynamo_args_against_the_app() -> None:
    rendered = render("""
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {name: agg, namespace: default}
spec:
  runtime: dynamo
  model: {name: m}
  dynamo: {engine: mocker, args: ["--model-name other"]}
  instanceSpec: {}
""")
    (problem,) = rendered.errors
    assert (problem.kind, problem.name) == ("ArksApplication", "agg")
    assert "--model-name is set by servedModelName" in problem.message
    assert [a["name"] for a in rendered.serve_config["applications"]] == ["gateway"]


PD = """
apiVersion: arks.ai/v1
kind: ArksDisaggregatedApplication
metadata: {name: pd, namespace: default}
spec:
  runtime: dynamo
  model: {name: m}
  dynamo: {engine: vllm, args: ["--enforce-eager"]}
  router: {replicas: 2, routerArgs: ["--router-mode kv"]}
  prefill: {replicas: 1, runtimeCommonArgs: ["--tp 2"]}
  decode: {replicas: 3}
"""


def test_render_gives_each_pd_side_its_args_and_the_router_its_frontend_args() -> None:
    rendered = render(PD)
    assert not rendered.errors
    args = serve_app(rendered, "pd")["args"]
    assert args["dynamo"] == {"engine": "vllm", "args": ["--enforce-eager"], "namespace": "arks-default-pd"}
    assert args["prefill"]["args"] == ["--tp 2"]
    assert args["decode"]["args"] == []
    assert args["router"] == {"replicas": 2, "args": ["--router-mode kv"]}
    assert len(args["prefill"]["placement_group_config"]["bundles"]) == 2
    assert args["decode"]["deployment_config"] == {"num_replicas": 3}


def test_render_refuses_owned_router_args() -> None:
    rendered = render(PD.replace("--router-mode kv", "--http-port 80"))
    (problem,) = rendered.errors
    assert "spec.router.routerArgs: --http-port is set by the sidecar supervisor" in problem.message
