"""The gateway's access log line: one JSON object per finished request. Pure.

Called by ``deployments.gateway_metrics.AccessLog`` (which writes the line to stdout) for every
``RequestRecord``. The line is built field by field from the record, never from the request, so a
token value, a prompt, an answer or a backend address cannot reach it: the record holds none of them.
"""

from __future__ import annotations

import json
import time

from arks_ray.gateway.records import RequestRecord

FIELDS = ("time", "request_id", "namespace", "token", "endpoint", "backend", "kind", "stream", "status",
          "outcome", "prompt_tokens", "completion_tokens", "cost", "ttft_ms", "duration_ms", "gateway_ms",
          "retries", "limit", "client_request_id")
"""Keys of every line, in order (``limit`` only on 429s, ``client_request_id`` only for a well-formed
``X-Request-Id``: the client's, or the one Serve's proxy adds and returns to the client)."""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def iso_time(unix_s: float) -> str:
    """UTC, millisecond precision, ``Z`` suffix: ``2026-12-02T23:01:02.345Z``."""
    whole = int(unix_s)
    millis = round((unix_s - whole) * 1000)
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def line(record: RequestRecord) -> str:
    """One JSON line (no newline) for one finished request."""
    entry: dict[str, object] = {
        "time": iso_time(record.started),
        "request_id": record.request_id,
        "namespace": record.namespace,
        "token": record.token,
        "endpoint": record.endpoint,
        "backend": record.backend,
        "kind": record.kind,
        "stream": record.stream,
        "status": record.status,
        "outcome": record.outcome,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost": round(record.cost, 9),
        "ttft_ms": _ms(record.ttft_s),
        "duration_ms": _ms(record.duration_s),
        "gateway_ms": _ms(record.gateway_s),
        "retries": record.retries,
    }
    if record.limit:
        entry["limit"] = record.limit
    if record.client_request_id:
        entry["client_request_id"] = record.client_request_id
    return json.dumps(entry, separators=(",", ":"))
