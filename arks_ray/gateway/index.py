"""The gateway's view of its configuration: token lookup, authorisation, the models a token sees.

Built by the ingress from each ``GatewayConfig`` it receives (``reconfigure``) and queried per request.
Tokens are looked up by the keyed digest (HMAC-SHA256, ``arks_ray.api.digests``) of the presented value
and compared in constant time, so neither the config nor the comparison leaks anything about a token.
The keys come from the replica's environment (a Secret, through ``secretKeyRef``) unless passed in.
"""

from __future__ import annotations

import hmac
import os
import re

from arks_ray.api.digests import TokenKeys
from arks_ray.api.gateway import Endpoint, GatewayConfig, Grant, Quota, Token
from arks_ray.errors import NotFound, PermissionDenied, Unauthenticated

BEARER = "bearer "
_PRINTABLE = re.compile(r"[\x21-\x7e]+\Z")


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; 401 if absent or malformed.

    Exact: the token is everything after the scheme and its space, less the spaces and tabs HTTP allows
    around a header value; any other character outside printable ASCII (a non-breaking space, a control
    character) makes it malformed rather than being trimmed away."""
    if not authorization:
        raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
    value = authorization[len(BEARER):].strip(" \t")
    if authorization[: len(BEARER)].lower() != BEARER or not value or not _PRINTABLE.match(value):
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <token>'")
    return value


class GatewayIndex:
    """Lookups over one ``GatewayConfig``. Immutable: a new config means a new index."""

    def __init__(self, config: GatewayConfig, keys: TokenKeys | None = None) -> None:
        self.config = config
        # No keys passed: the process environment, where the Ray pod's secretKeyRef puts them. None there
        # either: no token can authenticate (there is no unkeyed fallback).
        self._keys = keys if keys is not None else TokenKeys.from_environ(os.environ)
        self._tokens = {t.digest: t for t in config.tokens}
        self._endpoints = {e.name: e for e in config.endpoints}
        self._quotas = {q.name: q for q in config.quotas}

    def authenticate(self, authorization: str | None, now: float) -> Token:
        """The token behind a header, or 401 (unknown, disabled or expired all read the same to a caller)."""
        value = bearer_token(authorization)
        token = None
        for presented in self._keys.candidates(value) if self._keys is not None else ():
            token = self._tokens.get(presented)
            if token is not None and hmac.compare_digest(token.digest, presented):
                break
            token = None
        if token is None:
            raise Unauthenticated("invalid API token")
        if token.disabled:
            raise Unauthenticated("this API token is disabled")
        if token.expires_at is not None and now >= token.expires_at:
            raise Unauthenticated("this API token has expired")
        return token

    def authorize(self, token: Token, model: str) -> tuple[Endpoint, Grant]:
        """The endpoint and the token's grant on it; 404 for an unknown model, 403 if not granted."""
        endpoint = self._endpoints.get(model)
        if endpoint is None:
            raise NotFound(f"the model {model!r} does not exist", param="model")
        for grant in token.grants:
            if grant.endpoint == model:
                return endpoint, grant
        raise PermissionDenied(f"this API token may not use the model {model!r}", param="model")

    def models_for(self, token: Token) -> list[Endpoint]:
        """The endpoints a token may use, in config order."""
        allowed = {g.endpoint for g in token.grants}
        return [e for e in self.config.endpoints if e.name in allowed]

    def quota(self, name: str) -> Quota | None:
        return self._quotas.get(name)
