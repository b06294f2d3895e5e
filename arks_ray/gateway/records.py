"""What one finished request leaves behind: the record the gateway's metrics and access log are made from.

Built by the request lifecycle (``deployments.pipeline.RequestLifecycle.finish``) exactly once per request
that reached admission or was refused there, and handed to the ``Metrics`` port and the access log. It holds
no token, no prompt and no backend address: only names a tenant may see.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Outcome = Literal[
    "ok",  # answered (any status below 400), stream finished
    "client_error",  # 4xx from the engine or the gateway's own checks: the client's mistake
    "limited",  # refused by a rate limit (429)
    "quota",  # refused by a quota (429)
    "unauthorized",  # 401/403
    "backend_error",  # the backend failed (died, unreachable, timed out, 5xx)
    "unavailable",  # no backend could take it (503 before any backend was tried)
    "client_gone",  # the client left before the answer was complete
]


@dataclass(frozen=True)
class RequestRecord:
    """One request, as metrics and the access log see it."""

    request_id: str
    namespace: str
    token: str
    """The ArksToken's name (never its value); empty before authentication."""
    endpoint: str
    """The model (ArksEndpoint) asked for; empty when the request never named a known one."""
    backend: str
    """The backend that answered last; empty when none was tried."""
    kind: str
    """chat, completions, embeddings, responses, ..."""
    stream: bool
    status: int
    outcome: Outcome
    prompt_tokens: int
    completion_tokens: int
    cost: float
    """What the request cost against its endpoint's pricing (0 without pricing)."""
    started: float
    """Wall-clock time (s) the gateway took the request."""
    ttft_s: float | None
    """Time to the first byte from the backend, as the client sees it (None when nothing was relayed)."""
    duration_s: float
    """Time from taking the request to its last byte."""
    gateway_s: float
    """Time spent in the gateway itself before the backend was asked: auth, parsing, admission, routing."""
    retries: int = 0
    limit: str = ""
    """For a 429: the limit that refused it (rpm, tpm, concurrency, ... as the governor names it); else empty."""
    client_request_id: str = ""
    """The request's ``X-Request-Id`` when well formed (``client_request_id``), else empty: the client's own, or
    the one Serve's proxy gave it, which the client gets back in the response's ``x-request-id`` header and
    Serve's own log lines carry. Only logged: the gateway's keys use ``request_id``, which no client chooses."""


REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def client_request_id(headers: Mapping[str, str]) -> str:
    """The client's ``X-Request-Id``, if it is 1-64 characters of letters, digits and ``. _ : -``; else empty
    (the log keeps to ids a grep can match, and no client pads every line of it)."""
    value = headers.get(REQUEST_ID_HEADER) or ""
    return value if _CLIENT_ID.fullmatch(value) else ""
