"""Settings from the environment and flags, the error tree, resource paths and kopf's credentials."""

from __future__ import annotations

import dataclasses

import kubernetes.client
import pytest

from controller import errors
from controller.__main__ import build_settings, parse_args
from controller.handlers import connection_info
from controller.kube import RESOURCES
from controller.settings import ControllerSettings, from_env, with_password


def test_every_setting_has_a_docstring() -> None:
    import ast
    import inspect

    import controller.settings as module

    tree = ast.parse(inspect.getsource(module))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                following = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                assert documented, f"{cls.name}.{ast.unparse(node.target)} has no docstring"


def test_from_env_as_the_chart_sets_it() -> None:
    s = from_env({
        "ARKS_NAMESPACES": "team-a, team-b", "ARKS_REDIS_URL": "redis://arks-redis:6379/0",
        "ARKS_REDIS_PASSWORD": "p@ss/word", "ARKS_GATEWAY_REDIS_URL": "redis://arks-redis:6379/0",
        "ARKS_WATCH_SECRETS": "false", "ARKS_DRIFT_INTERVAL": "60", "ARKS_RUNTIME_IMAGE_VLLM": "my/vllm:1",
        "ARKS_HEAD_IMAGE": "my/head:1", "ARKS_RAY_VERSION": "2.61.0",
    })
    assert s.namespaces == ("team-a", "team-b")
    assert s.redis_url == "redis://:p%40ss%2Fword@arks-redis:6379/0"
    # The gateway's URL is rendered without the password, which goes to the namespace's gateway Secret.
    assert s.render.gateway_settings["redis_url"] == "redis://arks-redis:6379/0"
    assert s.gateway_redis_password == "p@ss/word"
    assert "p@ss" not in repr(s)
    assert s.watch_secrets is False
    assert s.timing.drift_interval == 60
    assert s.render.runtime_images["vllm"] == "my/vllm:1"
    assert s.render.runtime_images["sglang"] == ControllerSettings().render.runtime_images["sglang"]
    assert (s.render.head_image, s.render.ray_version) == ("my/head:1", "2.61.0")
    assert ControllerSettings().timing.drift_interval == 300  # the default was not mutated


def test_with_password() -> None:
    assert with_password("redis://h:6379", None) == "redis://h:6379"
    assert with_password("redis://u:p@h:6379", "x") == "redis://u:p@h:6379"
    assert with_password("rediss://h:6379/1", "x") == "rediss://:x@h:6379/1"


def test_flags_win_over_the_environment() -> None:
    args = parse_args(["-n", "a", "-n", "b", "--no-standalone", "--metrics-port", "0", "--drift-interval", "10"])
    s = build_settings(args, {"ARKS_NAMESPACES": "c"})
    assert s.namespaces == ("a", "b")
    assert s.standalone is False
    assert s.metrics_port is None
    assert s.health_port == 8081
    assert s.timing.drift_interval == 10
    assert build_settings(parse_args([]), {}).standalone is True


@pytest.mark.parametrize(("status", "kind"), [
    (0, errors.ApiUnavailable), (429, errors.ApiUnavailable), (503, errors.ApiUnavailable),
    (404, errors.NotFound), (409, errors.Conflict), (403, errors.Forbidden), (422, errors.Invalid),
    (400, errors.ApiError),
])
def test_error_tree(status: int, kind: type[errors.ApiError]) -> None:
    exc = errors.from_status(status, "r", "m")
    assert type(exc) is kind
    assert exc.status == status
    assert isinstance(exc, errors.TemporaryError) == (kind is errors.ApiUnavailable)
    assert isinstance(exc, errors.PermanentError) == (kind is errors.Invalid)


def test_resource_paths() -> None:
    assert RESOURCES["PersistentVolumeClaim"].path("ns", "x") == "/api/v1/namespaces/ns/persistentvolumeclaims/x"
    assert RESOURCES["ArksApplication"].path("ns", "a", "status") == \
        "/apis/arks.ai/v1/namespaces/ns/arksapplications/a/status"
    assert RESOURCES["Job"].api_version == "batch/v1"
    assert RESOURCES["ArksDisaggregatedApplication"].plural == "arksdisaggregatedapplications"


def test_kopf_logs_in_with_the_clients_configuration() -> None:
    cfg = kubernetes.client.Configuration(host="https://k8s:6443")
    cfg.api_key = {"BearerToken": "abc"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    cfg.ssl_ca_cert = "/ca.crt"
    info = connection_info(cfg)
    assert (info.server, info.scheme, info.token, info.ca_path, info.insecure) == (
        "https://k8s:6443", "Bearer", "abc", "/ca.crt", False)


def test_settings_are_plain_dataclasses() -> None:
    assert dataclasses.is_dataclass(ControllerSettings)


def test_a_bad_setting_stops_the_operator_with_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.__main__ import main

    monkeypatch.setenv("ARKS_NETWORK_POLICY", "serveFrom: [{podSelectr: {}}]")
    with pytest.raises(SystemExit) as exit_:
        main(["--metrics-port", "0", "--health-port", "0"])
    assert str(exit_.value.code).startswith("error: ARKS_NETWORK_POLICY: serveFrom: unknown peer field(s) podSelectr")
