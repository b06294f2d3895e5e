"""The one exception tree of arks-ray, and its mapping to OpenAI-style JSON errors.

Raised by the core (spec validation, gateway policy) and by the Serve deployments; the ingress maps
any ``ArksError`` to an HTTP response through :func:`to_openai_error` and nowhere else.

    ArksError
    └── RequestError              a client's request was refused
        ├── InvalidRequest        400  malformed JSON, invalid fields
        ├── Unauthenticated       401  token missing, unknown, expired or disabled
        ├── PermissionDenied      403  model not in the token's qos
        ├── NotFound              404  unknown model or route
        ├── MethodNotAllowed      405  a known route, another method
        ├── RequestTooLarge       413  body over the limit
        ├── RateLimited           429  rate_limit_exceeded
        ├── QuotaExceeded         429  insufficient_quota
        └── BackendUnavailable    503  no healthy backend, or the store is down under failClosed
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


class ArksError(Exception):
    """The root of every error arks-ray raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or questionable) with one Arks object, located by its field path."""

    kind: str
    name: str
    path: str
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = f"{self.kind}/{self.name}" if self.name else self.kind
        loc = f" {self.path}:" if self.path else ""
        return f"{self.severity}: {where}:{loc} {self.message}"


@dataclass
class RequestError(ArksError):
    """A request refused for a reason the client can act on. Subclasses fix status and type."""

    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    """Which rule refused it, for metrics and logs (a 429's limit: rpm, tpm, concurrency, quota)."""

    status: ClassVar[int] = 400
    type: ClassVar[str] = "invalid_request_error"
    code: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__init__(self.message)


# Distinct classes (not one class with a status argument) so that callers can catch precisely.
class InvalidRequest(RequestError):
    """400: malformed JSON or invalid fields."""

    status, type, code = 400, "invalid_request_error", None


class Unauthenticated(RequestError):
    """401: the bearer token is missing, unknown, expired or disabled."""

    status, type, code = 401, "authentication_error", "invalid_api_key"


class PermissionDenied(RequestError):
    """403: the token may not use this model."""

    status, type, code = 403, "permission_error", "model_not_allowed"


class NotFound(RequestError):
    """404: unknown model or route."""

    status, type, code = 404, "invalid_request_error", "model_not_found"


class MethodNotAllowed(RequestError):
    """405: the route exists, but not for this method."""

    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RequestTooLarge(RequestError):
    """413: the request body is over the configured limit."""

    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimited(RequestError):
    """429: a rate limit (rpm, tpm, concurrency, ...) is exhausted for now."""

    status, type, code = 429, "rate_limit_exceeded", "rate_limit_exceeded"


class QuotaExceeded(RequestError):
    """429: a quota (a budget over a period) is used up."""

    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class BackendUnavailable(RequestError):
    """503: no backend can take the request right now."""

    status, type, code = 503, "server_error", "backend_unavailable"


def to_openai_error(err: RequestError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Map an error to ``(status, body, headers)`` in OpenAI's error envelope."""
    body = {"error": {"message": err.message, "type": err.type, "code": err.code, "param": err.param}}
    return err.status, body, dict(err.headers)
