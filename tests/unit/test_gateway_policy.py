"""Gateway policy: token lookup and expiry, authorisation, weighted backend choice, usage metering."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import pytest

from arks_ray.api.gateway import Backend, Endpoint, GatewayConfig, Grant, Token
from arks_ray.engines.protocol import StreamMeter, with_usage
from arks_ray.errors import BackendUnavailable, NotFound, PermissionDenied, Unauthenticated
from arks_ray.gateway.index import GatewayIndex, bearer_token
from arks_ray.gateway.routing import choose_backend


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
def index() -> GatewayIndex:
    return GatewayIndex(GatewayConfig(
        endpoints=(Endpoint(name="m1", backends=(Backend(kind="app", name="a", weight=1),)),
                   Endpoint(name="m2")),
        tokens=(
            Token(name="alice", digest=digest("sk-alice"), grants=(Grant(endpoint="m1"),)),
            Token(name="off", digest=digest("sk-off"), disabled=True, grants=(Grant(endpoint="m1"),)),
            Token(name="old", digest=digest("sk-old"), expires_at=100.0, grants=(Grant(endpoint="m1"),)),
        ),
    ))


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "Bearer"])
def test_bearer_token_missing_or_malformed_is_401(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        bearer_token(header)


def test_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token("bearer sk-x") == "sk-x"
    assert bearer_token("BEARER  sk-x ") == "sk-x"


def test_authenticate_finds_the_token_by_digest(index: GatewayIndex) -> None:
    assert index.authenticate("Bearer sk-alice", now=0).name == "alice"


@pytest.mark.parametrize(("value", "now", "reason"), [
    ("sk-unknown", 0, "invalid"), ("sk-off", 0, "disabled"), ("sk-old", 100.0, "expired"),
])
def test_unknown_disabled_and_expired_tokens_are_401(index: GatewayIndex, value: str, now: float,
                                                     reason: str) -> None:
    with pytest.raises(Unauthenticated, match=reason):
        index.authenticate(f"Bearer {value}", now=now)


def test_a_token_is_valid_until_its_expiry(index: GatewayIndex) -> None:
    assert index.authenticate("Bearer sk-old", now=99.9).name == "old"


def test_authorize_distinguishes_unknown_model_from_forbidden(index: GatewayIndex) -> None:
    alice = index.authenticate("Bearer sk-alice", now=0)
    endpoint, grant = index.authorize(alice, "m1")
    assert (endpoint.name, grant.endpoint) == ("m1", "m1")
    with pytest.raises(NotFound):
        index.authorize(alice, "nope")
    with pytest.raises(PermissionDenied):
        index.authorize(alice, "m2")


def test_models_for_lists_only_granted_endpoints(index: GatewayIndex) -> None:
    alice = index.authenticate("Bearer sk-alice", now=0)
    assert [e.name for e in index.models_for(alice)] == ["m1"]


def _endpoint(*weights: int) -> Endpoint:
    return Endpoint(name="m", backends=tuple(Backend(kind="app", name=f"b{i}", weight=w)
                                            for i, w in enumerate(weights)))


def test_choice_follows_weights() -> None:
    rng = random.Random(7)
    counts = Counter(choose_backend(_endpoint(3, 1), rng).name for _ in range(8000))
    assert counts["b0"] / 8000 == pytest.approx(0.75, abs=0.02)


def test_zero_weight_drains_and_exclusion_skips() -> None:
    rng = random.Random(1)
    assert {choose_backend(_endpoint(0, 5), rng).name for _ in range(200)} == {"b1"}
    assert {choose_backend(_endpoint(1, 1), rng, exclude={"b0"}).name for _ in range(200)} == {"b1"}


def test_no_usable_backend_is_503() -> None:
    with pytest.raises(BackendUnavailable):
        choose_backend(_endpoint(0, 0), random.Random(0))
    with pytest.raises(BackendUnavailable):
        choose_backend(Endpoint(name="m"), random.Random(0))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
STREAM = [
    _event({"choices": [{"delta": {"content": "a"}}]}),
    _event({"choices": [{"delta": {"content": "b"}}]}),
    _event({"choices": [], "usage": USAGE}) + "data: [DONE]\n\n",
]


def test_meter_strips_the_usage_chunk_the_client_did_not_ask_for() -> None:
    meter = StreamMeter(client_usage=False)
    out = "".join(meter.filter(t) for t in STREAM)
    assert '"usage"' not in out
    assert out.endswith("data: [DONE]\n\n")
    assert meter.final()["usage"] == USAGE
    assert meter.final()["completion_tokens"] == 2


def test_meter_keeps_the_usage_chunk_when_asked() -> None:
    meter = StreamMeter(client_usage=True)
    out = "".join(meter.filter(t) for t in STREAM)
    assert out == "".join(STREAM)
    assert meter.usage == USAGE


def test_streams_always_request_usage_from_the_engine() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": False}}
    assert with_usage(body)["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert "stream_options" not in body or "include_usage" not in body["stream_options"]
    assert with_usage({"model": "m"}) == {"model": "m"}
