"""Gateway policy: keyed token lookup and expiry, authorisation, weighted backend choice, usage metering, and
the engine port's pure parts (failure classification, usage requested from engines)."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import pytest

from arks_ray.api.digests import TokenKeys
from arks_ray.api.gateway import Backend, Endpoint, GatewayConfig, Grant, Token
from arks_ray.engines.protocol import EngineRequest, Failure, Final, upstream_failure, wants_usage, with_usage
from arks_ray.engines.sse import StreamMeter
from arks_ray.errors import BackendUnavailable, NotFound, PermissionDenied, Unauthenticated
from arks_ray.gateway.index import GatewayIndex, bearer_token
from arks_ray.gateway.routing import choose_backend
from tests.support.mock_engine import KEYS, digest


def config() -> GatewayConfig:
    return GatewayConfig(
        endpoints=(Endpoint(name="m1", backends=(Backend(kind="app", name="a", weight=1),)),
                   Endpoint(name="m2")),
        tokens=(
            Token(name="alice", digest=digest("sk-alice"), grants=(Grant(endpoint="m1"),)),
            Token(name="off", digest=digest("sk-off"), disabled=True, grants=(Grant(endpoint="m1"),)),
            Token(name="old", digest=digest("sk-old"), expires_at=100.0, grants=(Grant(endpoint="m1"),)),
        ),
    )


@pytest.fixture
def index() -> GatewayIndex:
    return GatewayIndex(config(), KEYS)


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


def test_digests_are_keyed_so_the_plain_hash_of_a_token_finds_nothing() -> None:
    assert digest("sk-alice") != hashlib.sha256(b"sk-alice").hexdigest()
    other = TokenKeys.from_text("another-key-" + "o" * 32)
    with pytest.raises(Unauthenticated):  # a gateway under another key knows no token of this config
        GatewayIndex(config(), other).authenticate("Bearer sk-alice", now=0)


def test_a_key_being_rotated_in_is_accepted_next_to_the_current_one() -> None:
    rotating = TokenKeys(TokenKeys.from_text("new-key-" + "n" * 32).current, KEYS.current)
    assert GatewayIndex(config(), rotating).authenticate("Bearer sk-alice", now=0).name == "alice"


def test_without_keys_no_token_authenticates(monkeypatch: pytest.MonkeyPatch) -> None:
    from arks_ray.api.digests import TOKEN_KEY_ENV, TOKEN_KEY_NEXT_ENV

    monkeypatch.delenv(TOKEN_KEY_ENV, raising=False)
    monkeypatch.delenv(TOKEN_KEY_NEXT_ENV, raising=False)
    with pytest.raises(Unauthenticated, match="invalid"):
        GatewayIndex(config()).authenticate("Bearer sk-alice", now=0)


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
    assert meter.final() == Final(USAGE, 2)


def test_meter_keeps_the_usage_chunk_when_asked() -> None:
    meter = StreamMeter(client_usage=True)
    out = "".join(meter.filter(t) for t in STREAM)
    assert out == "".join(STREAM)
    assert meter.final() == Final(USAGE, 2)


LAST = {"choices": [{"delta": {"content": "c"}, "finish_reason": "stop"}], "usage": USAGE}


@pytest.mark.parametrize("client_usage", [False, True])
def test_usage_on_a_last_chunk_with_choices_is_metered_and_stripped_unless_asked(client_usage: bool) -> None:
    meter = StreamMeter(client_usage=client_usage)
    out = meter.filter(STREAM[0] + _event(LAST) + "data: [DONE]\n\n")
    assert meter.final() == Final(USAGE, 2)  # both content events counted, the usage recorded
    events = [json.loads(e[6:]) for e in out.split("\n\n") if e.startswith("data: {")]
    assert [e["choices"] for e in events] == [[{"delta": {"content": "a"}}], LAST["choices"]]
    assert ("usage" in events[-1]) is client_usage
    assert out.endswith("data: [DONE]\n\n")


def test_a_stream_without_usage_is_charged_its_content_events() -> None:
    meter = StreamMeter(client_usage=False)
    out = "".join(meter.filter(t) for t in STREAM[:2]) + meter.filter("data: [DONE]\n\n")
    assert out == STREAM[0] + STREAM[1] + "data: [DONE]\n\n"
    assert meter.final() == Final(None, 2)


def test_streams_always_request_usage_from_the_engine() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": False}}
    assert with_usage(body)["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert "stream_options" not in body or "include_usage" not in body["stream_options"]
    assert with_usage({"model": "m"}) == {"model": "m"}
    assert with_usage({"model": "m", "stream": True, "stream_options": None})["stream_options"] == {
        "include_usage": True}


@pytest.mark.parametrize(("body", "wanted"), [
    ({"stream": True, "stream_options": {"include_usage": True}}, True),
    ({"stream": True, "stream_options": {"include_usage": False}}, False),
    ({"stream": True, "stream_options": "yes"}, False),
    ({"stream": True}, False),
])
def test_wants_usage_reads_only_the_clients_own_option(body: dict, wanted: bool) -> None:
    assert wants_usage(body) is wanted


@pytest.mark.parametrize(("status", "kind", "shown"), [
    (400, "invalid", 400), (404, "invalid", 404), (413, "invalid", 413), (422, "invalid", 422),
    (408, "timeout", 504), (504, "timeout", 504), (429, "unavailable", 503), (503, "unavailable", 503),
    (500, "engine", 502), (502, "engine", 502),
])
def test_upstream_statuses_are_classified_by_whose_fault_they_are(status: int, kind: str, shown: int) -> None:
    failure = upstream_failure(status, "m")
    assert (failure.kind, failure.status) == (kind, shown)
    assert failure.blames_backend is (kind != "invalid")
    assert failure.body()["error"]["type"] == ("invalid_request_error" if shown < 500 else "server_error")


def test_a_failure_body_is_openais_envelope() -> None:
    assert Failure("invalid", 400, "bad n", param="n", code="x").body() == {
        "error": {"message": "bad n", "type": "invalid_request_error", "code": "x", "param": "n"}}


def test_an_engine_request_exposes_messages_or_prompt_for_prefix_routing() -> None:
    chat = EngineRequest("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert chat.messages == [{"role": "user", "content": "hi"}]
    assert not hasattr(chat, "prompt")
    assert chat.stream
    embed = EngineRequest("embeddings", {"model": "m", "prompt": "x", "stream": True})
    assert (embed.prompt, embed.stream) == ("x", False)  # an embedding never streams
