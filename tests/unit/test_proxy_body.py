"""``deployments.proxy_body``: an ingress replica behind Serve's proxy looks the proxy up once, not per request.

Ray's own lookup and the handle's behaviour are faked here; the shared stack's every request goes through the real
one, and ``tests/e2e/test_request_path.py`` restarts the real proxy under it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve._private import common

from deployments import proxy_body


class Handle:
    """A proxy actor handle: ``receive_asgi_messages.remote(md)`` answers, or raises ``fail``."""

    def __init__(self, answer: bytes, fail: BaseException | None = None) -> None:
        self.answer, self.fail, self.calls = answer, fail, 0
        self.receive_asgi_messages = self

    def remote(self, request_metadata: Any) -> Any:
        self.calls += 1

        async def reply() -> bytes:
            if self.fail is not None:
                raise self.fail
            return self.answer
        return reply()


@pytest.fixture(autouse=True)
def rays_class_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """``install`` changes Ray's class in this process: put it back after each test."""
    monkeypatch.setattr(common.StreamingHTTPRequest, "receive_asgi_messages",
                        common.StreamingHTTPRequest.__dict__["receive_asgi_messages"])


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Handle]]:
    """Handles ``ray.get_actor`` hands out, in order; what it was asked for is checked on the way."""
    queue: list[Handle] = []
    given: list[Handle] = []

    def get_actor(name: str, namespace: str) -> Handle:
        assert (name, namespace) == ("SERVE_PROXY_ACTOR-node", "serve")
        given.append(queue.pop(0))
        return given[-1]

    monkeypatch.setattr(proxy_body.ray, "get_actor", get_actor)
    monkeypatch.setattr(proxy_body, "_proxies", {})
    yield queue
    assert not queue, "a handle was not asked for"


def test_rays_per_request_lookup_is_what_is_replaced() -> None:
    """The text of Ray 2.60 this relies on: the request names its proxy, and each one looks it up."""
    source = inspect.getsource(common.StreamingHTTPRequest)
    assert "self._cached_proxy_actor = ray.get_actor(" in source
    assert "self._proxy_actor_name, namespace=SERVE_NAMESPACE" in source
    assert "self._cached_proxy_actor.receive_asgi_messages.remote" in source


def test_install_gives_each_request_one_shared_lookup(lookups: list[Handle]) -> None:
    assert proxy_body.install()
    assert proxy_body.install()  # idempotent
    proxy = Handle(b"body")
    lookups.append(proxy)
    first = common.StreamingHTTPRequest(asgi_scope={}, proxy_actor_name="SERVE_PROXY_ACTOR-node")
    second = common.StreamingHTTPRequest(asgi_scope={}, proxy_actor_name="SERVE_PROXY_ACTOR-node")
    assert isinstance(first.receive_asgi_messages, proxy_body.ProxyBody)
    assert asyncio.run(first.receive_asgi_messages(None)) == b"body"
    assert asyncio.run(second.receive_asgi_messages(None)) == b"body"
    assert proxy.calls == 2  # two bodies, one lookup (the fixture hands out one handle)


def test_a_request_that_brings_its_own_receive_keeps_it() -> None:
    async def own(request_metadata: Any) -> bytes:
        return b"own"

    assert proxy_body.install()
    request = common.StreamingHTTPRequest(asgi_scope={}, receive_asgi_messages=own)
    assert request.receive_asgi_messages is own


def test_a_replaced_proxy_is_looked_up_again_and_asked_once_more(lookups: list[Handle]) -> None:
    dead = Handle(b"", fail=ActorDiedError())
    new = Handle(b"from the new proxy")
    lookups.extend([dead, new])
    body = proxy_body.ProxyBody("SERVE_PROXY_ACTOR-node")
    assert asyncio.run(body(None)) == b"from the new proxy"
    assert asyncio.run(body(None)) == b"from the new proxy"
    assert (dead.calls, new.calls) == (1, 2)


def test_a_proxy_that_may_have_taken_the_call_is_not_asked_twice(lookups: list[Handle]) -> None:
    unavailable = Handle(b"", fail=ActorUnavailableError("network hiccup", None))
    lookups.append(unavailable)
    with pytest.raises(ActorUnavailableError):
        asyncio.run(proxy_body.ProxyBody("SERVE_PROXY_ACTOR-node")(None))
    assert unavailable.calls == 1
