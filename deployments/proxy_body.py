"""One lookup of Serve's proxy per proxy, not per request, when an ingress replica fetches a request's body.

Behind Serve's proxy (a cluster's default ingress) the proxy sends a replica only the request's headers; the
replica fetches the body with an actor call back to the proxy. Ray 2.60 finds that proxy by name for every
request (``StreamingHTTPRequest.receive_asgi_messages`` calls ``ray.get_actor``): a synchronous GCS round trip,
0.54 ms at p50 on an idle 2-core machine, on the event loop that also takes in every other request and relays
every stream. A burst of 128 requests does 128 of them one after another.

``install()`` keeps one handle per proxy name for the replica's life. A proxy that dies is replaced by a new
actor of the same name, and a call on the old handle raises ``ActorDiedError`` without running, so the call is
sent once more to the proxy that has the name now; a request that the dead proxy had taken is unknown there and
fails as before (its client's connection went with that proxy).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import ActorDiedError
from ray.serve._private.common import StreamingHTTPRequest
from ray.serve._private.constants import SERVE_NAMESPACE

logger = logging.getLogger("ray.serve.arks.gateway")

_proxies: dict[str, Any] = {}
"""Proxy actor handles by name. The handle itself is kept: an actor method holds only a weak reference to it."""


def _proxy(name: str) -> Any:
    handle = _proxies.get(name)
    if handle is None:
        handle = _proxies[name] = ray.get_actor(name, namespace=SERVE_NAMESPACE)
    return handle


class ProxyBody:
    """``receive_asgi_messages`` for one request: the proxy's pickled ASGI messages, from the cached handle."""

    def __init__(self, proxy_name: str) -> None:
        self.proxy_name = proxy_name

    async def __call__(self, request_metadata: Any) -> bytes:
        handle = _proxy(self.proxy_name)
        try:
            return await handle.receive_asgi_messages.remote(request_metadata)  # type: ignore[no-any-return]
        except ActorDiedError:
            if _proxies.get(self.proxy_name) is handle:
                del _proxies[self.proxy_name]
            return await _proxy(self.proxy_name).receive_asgi_messages.remote(  # type: ignore[no-any-return]
                request_metadata)


def _receive_asgi_messages(self: StreamingHTTPRequest) -> Any:
    if self._receive_asgi_messages is None:
        assert self._proxy_actor_name is not None  # Ray's own invariant: one of the two is set
        self._receive_asgi_messages = ProxyBody(self._proxy_actor_name)
    return self._receive_asgi_messages


def install() -> bool:
    """Replace Ray's per-request lookup in this process; False (and Ray's way) where Ray's class has changed."""
    current = StreamingHTTPRequest.__dict__.get("receive_asgi_messages")
    if not isinstance(current, property) or not {"_proxy_actor_name", "_receive_asgi_messages"} <= set(
            vars(StreamingHTTPRequest(asgi_scope={}, proxy_actor_name="probe"))):
        logger.warning("Ray's StreamingHTTPRequest has changed: each request's body is fetched Ray's way")
        return False
    if current.fget is not _receive_asgi_messages:
        StreamingHTTPRequest.receive_asgi_messages = property(_receive_asgi_messages)  # type: ignore[method-assign,assignment]
    return True
