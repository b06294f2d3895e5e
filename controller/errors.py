"""The operator's own exception tree: what went wrong, and whether retrying can help.

Raised by the Kubernetes adapter (``controller.kube``) and the reconciler; caught by the scheduler
(``controller.scheduling``), which retries by type. The client library's exceptions never travel past
the adapter, so the library can be swapped without touching the reconciler (kopf does the same for
aiohttp).

    ControllerError
    ├── TemporaryError            retry after ``delay`` seconds
    │   └── ApiUnavailable        no answer: connection refused, timeout, 429, 5xx
    ├── PermanentError            the same input will fail again; wait for the next change
    └── ApiError                  the API server answered with an error status
        ├── NotFound              404
        ├── Conflict              409: already exists, or a stale resourceVersion
        ├── Forbidden             403: RBAC (the chart's ClusterRole lacks a verb)
        └── Invalid               422: the server rejected a manifest (also a PermanentError)
"""

from __future__ import annotations


class ControllerError(Exception):
    """The root of every error the operator raises on purpose."""


class TemporaryError(ControllerError):
    """A potentially recoverable error: retry after ``delay`` seconds (None: the scheduler's backoff)."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(ControllerError):
    """Retrying with the same input is useless; the next change (or drift tick) tries again."""


class ApiError(ControllerError):
    """The API server answered a request with an error status."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip(": "))
        self.status = status
        self.reason = reason
        self.message = message


class ApiUnavailable(TemporaryError, ApiError):
    """No usable answer: the connection failed, timed out, or the server is overloaded (429, 5xx)."""

    def __init__(self, status: int, reason: str = "", message: str = "", delay: float | None = None) -> None:
        ApiError.__init__(self, status, reason, message)
        self.delay = delay


class NotFound(ApiError):
    """404: the object (or its resource type) does not exist."""


class Conflict(ApiError):
    """409: the object already exists, or it changed since it was read."""


class Forbidden(ApiError):
    """403: the service account may not do this; see the RBAC in charts/arks-ray/templates/rbac.yaml."""


class Invalid(ApiError, PermanentError):
    """422: the server rejected a manifest; re-sending it will not help."""


def from_status(status: int, reason: str = "", message: str = "", retry_after: float | None = None) -> ApiError:
    """The error for an HTTP status (0 means no response at all)."""
    if status == 0 or status == 429 or status >= 500:
        return ApiUnavailable(status, reason, message, delay=retry_after)
    kinds: dict[int, type[ApiError]] = {404: NotFound, 409: Conflict, 403: Forbidden, 401: Forbidden, 422: Invalid}
    return kinds.get(status, ApiError)(status, reason, message)
