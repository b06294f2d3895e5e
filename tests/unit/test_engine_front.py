"""``deployments.engines.fronted``: under Ray's HAProxy ingress, an engine app whose engine has a custom request
router gets a placeholder ingress (``EngineFront``), which Ray's own ``build_app`` then accepts; otherwise the app
is the engine deployment alone, as ever. The e2e (``tests/e2e/test_haproxy_ingress.py``) serves such an app."""

from __future__ import annotations

from typing import Any

import pytest
from ray import serve
from ray.serve._private import build_app as ray_build_app
from ray.serve._private import constants
from ray.serve.exceptions import RayServeException

from arks_ray.engines.protocol import FRONT_DEPLOYMENT
from deployments.engines import EngineFront, fronted

ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"


class Engine:
    pass


def engine_app(router: str | None) -> Any:
    options: dict[str, Any] = {"name": "arks-engine:m"}
    if router:
        options["request_router_config"] = {"request_router_class": router}
    return serve.deployment(**options)(Engine).bind()


def build(app: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The deployment names Ray's own builder makes of ``app`` with HAProxy on (its refusal, if any, raised)."""
    monkeypatch.setattr(ray_build_app, "RAY_SERVE_ENABLE_HA_PROXY", True)
    built = ray_build_app.build_app(app, name="m", make_deployment_handle=lambda d, a: None)
    return sorted(d.name for d in built.deployments)


def test_under_haproxy_a_custom_router_gets_a_placeholder_ingress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", True)
    with pytest.raises(RayServeException):  # what Ray does with the engine alone
        build(engine_app(ROUTER), monkeypatch)
    app = fronted(engine_app(ROUTER))
    assert app._bound_deployment.func_or_class is EngineFront
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 0
    assert build(app, monkeypatch) == sorted([FRONT_DEPLOYMENT, "arks-engine:m"])
    plain = engine_app(None)
    assert fronted(plain) is plain  # Ray's default router: nothing in front


def test_without_haproxy_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False)
    app = engine_app(ROUTER)
    assert fronted(app) is app
