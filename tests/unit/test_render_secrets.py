"""Secrets stay secret: every example rendered as the operator renders it, searched for anything secret.

What must never appear in a rendered object (RayService, its Serve config, PVCs, Jobs): a token value, an
unkeyed SHA-256 of one, a token key (installation or namespace), the Redis password. What must appear
instead: keyed digests that the namespace's gateway, holding its key from the environment, accepts;
``secretKeyRef`` entries on the head pod. Key rotation is driven end to end through ``GatewayIndex``.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from arks_ray.api import load_documents
from arks_ray.api.digests import TOKEN_KEY_ENV, TOKEN_KEY_NEXT_ENV, TokenKeyError, TokenKeys, token_digest
from arks_ray.api.gateway import GatewayConfig, Grant, Token
from arks_ray.api.loading import Loaded, load_yaml
from arks_ray.api.token import ArksToken
from arks_ray.errors import Unauthenticated
from arks_ray.gateway.index import GatewayIndex
from arks_ray.gateway.settings import GatewaySettings
from arks_ray.local.keys import local_token_keys
from arks_ray.render import Rendered, render
from arks_ray.render.names import CONTENT_ANNOTATION
from arks_ray.render.options import SERVE_THROUGHPUT_ENV
from controller.gateway_secret import gateway_secret, secret_write
from controller.plans import Observed, plan_namespace
from controller.settings import from_env
from controller.snapshot import take
from tests.support.keys import TEST_KEYS
from tests.support.paths import FIXTURES, ROOT

EXAMPLES = sorted((ROOT / "configs/examples").glob("*.yaml"))
SAMPLES = sorted((FIXTURES / "arks/samples").glob("*.yaml"))
INSTALL_KEY = "0f" * 32
REDIS_PASSWORD = "r3dis-Pa55word-never-rendered"
CHART_ENV = {  # what the chart gives the operator (charts/arks-ray/templates/deployment.yaml)
    TOKEN_KEY_ENV: INSTALL_KEY,
    "ARKS_REDIS_URL": "redis://arks-redis.arks-system.svc:6379/0",
    "ARKS_GATEWAY_REDIS_URL": "redis://arks-redis.arks-system.svc:6379/0",
    "ARKS_REDIS_PASSWORD": REDIS_PASSWORD,
}


def _token_values(loaded: Loaded) -> list[str]:
    values = [o.spec.token for o in loaded.objects if isinstance(o, ArksToken) and o.spec.token]
    values += [v for s in loaded.secrets for v in s.data.values()]
    return values


def _forbidden(loaded: Loaded, keys: TokenKeys, namespaces: list[str]) -> dict[str, str]:
    out = {REDIS_PASSWORD: "the Redis password", keys.current.decode(): "the installation key"}
    for ns in namespaces:
        out[keys.for_namespace(ns).current.decode()] = f"the token key of {ns}"
    for value in _token_values(loaded):
        out[value] = "a token value"
        out[hashlib.sha256(value.encode()).hexdigest()] = "an unkeyed SHA-256 of a token"
    return out


def _rendered_text(results: list[Rendered]) -> str:
    docs = [m for r in results for m in r.manifests]
    return "\n".join([yaml.safe_dump_all(docs), json.dumps(docs), *(r.rayservice["spec"]["serveConfigV2"]
                                                                     for r in results),
                      *(str(p) for r in results for p in r.problems)])


def _render_as_operator(path: Path) -> tuple[Loaded, list[Rendered]]:
    settings = from_env(CHART_ENV)
    loaded = load_yaml(path.read_text())
    return loaded, render(loaded, options=settings.render)


@pytest.mark.parametrize("path", [*EXAMPLES, *SAMPLES, FIXTURES / "arks/quickstart.yaml"], ids=lambda p: p.name)
def test_no_secret_and_no_unkeyed_digest_in_any_rendered_object(path: Path) -> None:
    loaded, results = _render_as_operator(path)
    text = _rendered_text(results)
    forbidden = _forbidden(loaded, TokenKeys.from_text(INSTALL_KEY), [r.namespace for r in results])
    found = {what for value, what in forbidden.items() if value in text}
    assert found == set()
    for rendered in results:
        # The gateway gets its Redis URL without a password, and its secrets only by reference.
        gateway = rendered.serve_config["applications"][0]
        assert gateway["args"]["settings"]["redis_url"] == "redis://arks-redis.arks-system.svc:6379/0"
        head = rendered.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        env = {e["name"]: e for e in head["containers"][0]["env"]}
        assert env[TOKEN_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "arks-gateway", "key": "token-key"}
        assert env["ARKS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
        # Plain values are only Ray Serve's settings; every secret comes by reference.
        assert {n for n, e in env.items() if "value" in e} == set(SERVE_THROUGHPUT_ENV)


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "ArksToken" in p.read_text()], ids=lambda p: p.name)
def test_each_rendered_digest_is_accepted_only_with_its_namespaces_key(path: Path) -> None:
    loaded, results = _render_as_operator(path)
    keys = TokenKeys.from_text(INSTALL_KEY)
    tokens = {t.metadata.name: t for t in loaded.objects if isinstance(t, ArksToken)}
    secrets = {(s.namespace, s.name): s for s in loaded.secrets}
    checked = 0
    for rendered in results:
        config = rendered.gateway
        for token in config.tokens:
            spec = tokens[token.name].spec
            ref = spec.token_secret_ref
            value = spec.token or (secrets[rendered.namespace, ref.name].data[ref.key] if ref else "")
            header = f"Bearer {value}"
            own = GatewayIndex(config, keys.for_namespace(rendered.namespace))
            assert own.authenticate(header, 0).name == token.name
            for wrong in (keys, keys.for_namespace(rendered.namespace + "-other"),
                          TokenKeys.from_text("1e" * 32).for_namespace(rendered.namespace)):
                with pytest.raises(Unauthenticated):
                    GatewayIndex(config, wrong).authenticate(header, 0)
            checked += 1
    assert checked >= 1


def test_the_gateway_reads_its_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = TEST_KEYS.for_namespace("default")
    config = GatewayConfig(tokens=(Token(name="t", digest=keys.digest("sk-x"), grants=(Grant(endpoint="m"),)),))
    monkeypatch.setenv(TOKEN_KEY_ENV, keys.current.decode())
    assert GatewayIndex(config).authenticate("Bearer sk-x", 0).name == "t"
    monkeypatch.delenv(TOKEN_KEY_ENV)
    with pytest.raises(Unauthenticated):  # no key: nothing authenticates, there is no unkeyed fallback
        GatewayIndex(config).authenticate("Bearer sk-x", 0)


def test_key_rotation_in_two_steps_never_refuses_a_valid_token() -> None:
    """README "Token key rotation": add the next key, restart gateways, then make it the key."""
    old, new = "a1" * 32, "b2" * 32
    value, header = "sk-test123456", "Bearer sk-test123456"

    def config(keys: TokenKeys) -> GatewayConfig:
        digest = keys.for_namespace("ns").digest(value)
        return GatewayConfig(tokens=(Token(name="t", digest=digest, grants=(Grant(endpoint="m"),)),))

    def accepts(gateway: TokenKeys, cfg: GatewayConfig) -> bool:
        try:
            GatewayIndex(cfg, gateway.for_namespace("ns")).authenticate(header, 0)
        except Unauthenticated:
            return False
        return True

    before = TokenKeys.from_text(old)
    step1 = TokenKeys.from_text(old, new)  # digests still under the old key; gateways learn the new one
    step2 = TokenKeys.from_text(new)
    assert config(step1) == config(before)  # step 1 changes no digest, so no config push is needed
    # Step 1: gateways not restarted yet (old key) and restarted ones (old + next) both accept.
    assert accepts(before, config(step1))
    assert accepts(step1, config(step1))
    # Step 2: digests under the new key; every gateway restarted in step 1 accepts, so does a new one.
    assert accepts(step1, config(step2))
    assert accepts(step2, config(step2))
    # Skipping step 1 is what refuses tokens: a gateway with only the old key cannot check new digests.
    assert not accepts(before, config(step2))


def test_keys_are_long_enough_and_never_printed() -> None:
    with pytest.raises(TokenKeyError, match="at least 32"):
        TokenKeys.from_text("sk-test123456")
    keys = TokenKeys.from_text(INSTALL_KEY, "cd" * 32)
    assert INSTALL_KEY not in repr(keys)
    assert "cd" * 32 not in repr(keys)
    assert keys.digest("v") == token_digest(INSTALL_KEY.encode(), "v") != hashlib.sha256(b"v").hexdigest()
    assert keys.for_namespace("a").environ() == {TOKEN_KEY_ENV: keys.for_namespace("a").current.decode(),
                                                 TOKEN_KEY_NEXT_ENV: keys.for_namespace("a").next.decode()}


def test_the_operator_writes_the_gateway_secret_before_the_rayservice_and_only_when_it_changes() -> None:
    settings = from_env(CHART_ENV)
    docs = [d for d in yaml.safe_load_all((FIXTURES / "arks/quickstart.yaml").read_text()) if d]
    for i, d in enumerate(docs):
        d.setdefault("metadata", {}).update(namespace="default", uid=f"u{i}", generation=1)
    plan = plan_namespace(take("default", docs), Observed(), options=settings.render, now=1.7e9,
                          finalizer="f", redis_password=settings.gateway_redis_password)
    order = [w.kind for phase in plan.phases for w in phase]
    assert order.index("Secret") < order.index("RayService")
    (secret,) = [w for w in plan.writes if w.kind == "Secret"]
    assert secret.body is not None
    assert secret.body["stringData"] == {
        "token-key": TokenKeys.from_text(INSTALL_KEY).for_namespace("default").current.decode(),
        "redis-password": REDIS_PASSWORD}
    (rayservice,) = [w for w in plan.writes if w.kind == "RayService"]
    assert REDIS_PASSWORD not in json.dumps(rayservice.body)
    assert INSTALL_KEY not in json.dumps(rayservice.body)
    # Unchanged: nothing to write. Rotated (a next key): rewritten.
    live = {"metadata": secret.body["metadata"]}
    assert secret_write(secret.body, live, "default", "arks-gateway") is None
    rotated = gateway_secret("default", "arks-gateway", TokenKeys.from_text(INSTALL_KEY, "ee" * 32), REDIS_PASSWORD)
    assert rotated is not None
    assert "token-key-next" in rotated["stringData"]
    assert rotated["metadata"]["annotations"][CONTENT_ANNOTATION] != live["metadata"]["annotations"][
        CONTENT_ANNOTATION]
    assert secret_write(rotated, live, "default", "arks-gateway") is not None


def test_without_a_key_tokens_are_refused_by_name_and_no_secret_is_written() -> None:
    loaded = load_documents([d for d in yaml.safe_load_all((FIXTURES / "arks/quickstart.yaml").read_text()) if d])
    (rendered,) = render(loaded)
    assert rendered.gateway.tokens == ()
    assert [(p.kind, p.path) for p in rendered.errors] == [("ArksToken", "spec.token")]
    assert gateway_secret("default", "arks-gateway", None, REDIS_PASSWORD) is None


def test_gateway_settings_take_the_redis_password_from_the_environment() -> None:
    settings = GatewaySettings(redis_url="redis://r:6379/0")
    assert settings.with_secrets({}).redis_url == "redis://r:6379/0"
    assert settings.with_secrets({"ARKS_REDIS_PASSWORD": "p@ss/w"}).redis_url == "redis://:p%40ss%2Fw@r:6379/0"
    given = GatewaySettings(redis_url="redis://u:x@r:6379/0")
    assert given.with_secrets({"ARKS_REDIS_PASSWORD": "y"}).redis_url == "redis://u:x@r:6379/0"


def test_the_local_key_is_made_once_private_and_the_environment_wins(tmp_path: Path) -> None:
    env: dict[str, Any] = {"ARKS_RAY_CACHE": str(tmp_path)}
    first = local_token_keys(env)
    path = tmp_path / "token-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_token_keys(env) == first
    given = {**env, TOKEN_KEY_ENV: "c3" * 32}
    assert local_token_keys(given) == TokenKeys.from_text("c3" * 32)
