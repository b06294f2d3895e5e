"""Keyed token digests: HMAC-SHA256 under a per-installation key, so a digest is useless without it.

Used by the renderer (``arks_ray.render.gateway_config``), which turns token values into digests for the
Serve config, and by the gateway (``arks_ray.gateway.index``), which digests each presented token the
same way. Both sides import it from here, so they cannot drift apart.

Keys never travel in a Serve config. The operator holds the installation key (a Kubernetes Secret, as
an environment variable); each namespace gets its own key derived from it (``for_namespace``), which
reaches that namespace's gateway replicas through a Secret and ``secretKeyRef`` (``TOKEN_KEY_ENV``). A
tenant who can read its own namespace's Secret therefore learns nothing that digests another
namespace's tokens.

Rotation is two steps, so that no request fails at any point (README, "Token key rotation"):
``next`` is a key gateways already accept while digests are still made with ``current``; once every
gateway runs with it, it becomes ``current``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

TOKEN_KEY_ENV = "ARKS_TOKEN_KEY"  # noqa: S105 - a variable name
"""Environment variable holding the key digests are made with (operator: installation key; gateway:
the namespace's derived key)."""

TOKEN_KEY_NEXT_ENV = "ARKS_TOKEN_KEY_NEXT"  # noqa: S105 - a variable name
"""Environment variable holding the key being rotated in: accepted by gateways, not yet used for digests."""

MIN_KEY_CHARS = 32
"""Shortest key text accepted (``openssl rand -hex 32`` gives 64)."""

_DERIVE = b"arks-ray/token-key/v1/"
_FINGERPRINT = b"arks-ray/token-key-id/v1"


class TokenKeyError(ValueError):
    """A token key that is missing or too short."""


def _key(text: str, what: str) -> bytes:
    text = text.strip()
    if len(text) < MIN_KEY_CHARS:
        raise TokenKeyError(f"{what} is {len(text)} characters; at least {MIN_KEY_CHARS} are needed "
                        "(e.g. `openssl rand -hex 32`)")
    return text.encode()


def token_digest(key: bytes, value: str) -> str:
    """The HMAC-SHA256 hex digest under which a gateway holding ``key`` knows a token."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class TokenKeys:
    """The key digests are made with, and the one being rotated in (accepted, not yet used)."""

    current: bytes
    next: bytes | None = None

    @classmethod
    def from_text(cls, current: str, next_key: str | None = None) -> TokenKeys:
        """Keys as kept in a Secret or an environment variable; raises ``TokenKeyError`` if too short."""
        return cls(_key(current, "the token key"),
                   _key(next_key, "the next token key") if next_key and next_key.strip() else None)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TokenKeys | None:
        """Keys from ``TOKEN_KEY_ENV``/``TOKEN_KEY_NEXT_ENV``; None when no key is set."""
        current = environ.get(TOKEN_KEY_ENV, "")
        if not current.strip():
            return None
        return cls.from_text(current, environ.get(TOKEN_KEY_NEXT_ENV))

    def digest(self, value: str) -> str:
        """The digest a renderer writes: under ``current``."""
        return token_digest(self.current, value)

    def candidates(self, value: str) -> list[str]:
        """Digests a gateway looks a presented token up under: ``current``, then ``next``."""
        out = [token_digest(self.current, value)]
        if self.next is not None:
            out.append(token_digest(self.next, value))
        return out

    def for_namespace(self, namespace: str) -> TokenKeys:
        """The keys of one namespace's gateway, derived from the installation's (one-way)."""
        def derive(key: bytes) -> bytes:
            return hmac.new(key, _DERIVE + namespace.encode(), hashlib.sha256).hexdigest().encode()

        return TokenKeys(derive(self.current), derive(self.next) if self.next is not None else None)

    def environ(self) -> dict[str, str]:
        """These keys as the environment variables a gateway reads (the local runner's ``ray start``)."""
        out = {TOKEN_KEY_ENV: self.current.decode()}
        if self.next is not None:
            out[TOKEN_KEY_NEXT_ENV] = self.next.decode()
        return out

    @property
    def fingerprint(self) -> str:
        """A short, non-secret id of ``current`` (for logs and an annotation; reveals nothing of the key)."""
        return hmac.new(self.current, _FINGERPRINT, hashlib.sha256).hexdigest()[:12]

    def __repr__(self) -> str:  # never print a key
        return f"TokenKeys(fingerprint={self.fingerprint!r}, next={'set' if self.next else 'unset'})"
