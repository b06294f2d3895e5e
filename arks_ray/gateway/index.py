"""The gateway's view of its configuration: token lookup, authorisation, the models a token sees.

Built by the ingress from each ``GatewayConfig`` it receives (``reconfigure``) and queried per request.
Tokens are looked up by the SHA-256 of the presented value and compared in constant time, so neither
the config nor the comparison leaks anything about a token.
"""

from __future__ import annotations

import hashlib
import hmac

from arks_ray.api.gateway import Endpoint, GatewayConfig, Grant, Quota, Token
from arks_ray.errors import NotFound, PermissionDenied, Unauthenticated

BEARER = "bearer "


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; 401 if absent or malformed."""
    if not authorization:
        raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
    if authorization[: len(BEARER)].lower() != BEARER or not authorization[len(BEARER):].strip():
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <token>'")
    return authorization[len(BEARER):].strip()


class GatewayIndex:
    """Lookups over one ``GatewayConfig``. Immutable: a new config means a new index."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._tokens = {t.digest: t for t in config.tokens}
        self._endpoints = {e.name: e for e in config.endpoints}
        self._quotas = {q.name: q for q in config.quotas}

    def authenticate(self, authorization: str | None, now: float) -> Token:
        """The token behind a header, or 401 (unknown, disabled or expired all read the same to a caller)."""
        presented = hashlib.sha256(bearer_token(authorization).encode()).hexdigest()
        token = self._tokens.get(presented)
        if token is None or not hmac.compare_digest(token.digest, presented):
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
