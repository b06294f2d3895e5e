"""What the gateway checks of an OpenAI request body before it costs anything. Pure.

Called by the HTTP surface (``deployments.http_api``) on every parsed body. These are the mistakes that
would otherwise reach an engine and come back as its error (or worse, be served at a cost the limits did
not see): the engine stays the judge of everything else, and its refusals are classified as the client's
(``arks_ray.engines.protocol.FailureKind``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from arks_ray.errors import InvalidRequest

_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json(raw: bytes) -> Any:
    """The JSON value of ``raw``; 400 for anything that is not valid JSON text in UTF-8 (lone surrogates,
    nesting too deep for the parser, numbers it cannot hold)."""
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise InvalidRequest(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if _SURROGATE.search(raw) and _has_lone_surrogate(value):
        raise InvalidRequest("request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff), "
                             "which is not valid Unicode text")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (RecursionError, ValueError):
        return False
    return False


def check_request(kind: str, body: Any, *, max_n: int, max_prompts: int) -> dict[str, Any]:
    """``body`` as a request the gateway may admit, or 400 naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    if body.get("stream_options") is not None and stream is not True:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n):
        raise InvalidRequest(f"'n' must be an integer from 1 to {max_n}", param="n")
    for field in ("prompt", "input"):
        items = body.get(field)
        if isinstance(items, list) and len(items) > max_prompts and not all(isinstance(i, int) for i in items):
            raise InvalidRequest(f"'{field}' holds {len(items)} items; at most {max_prompts} are accepted",
                                 param=field)
    if kind == "responses":
        refuse_stateful(body)
    return body


STATEFUL = {
    "previous_response_id": "previous_response_id needs responses stored by the server",
    "conversation": "conversation needs conversations stored by the server",
    "background": "background needs the response stored by the server",
}


def refuse_stateful(body: dict[str, Any]) -> None:
    """The Responses API is served statelessly: nothing is stored, so what needs stored state is a 400
    naming the field (send the whole input each time instead)."""
    for field, why in STATEFUL.items():
        if body.get(field) not in (None, False):
            raise InvalidRequest(f"'{field}' is not supported: {why}, and this platform keeps no state; "
                                 "send the full input instead", param=field)
    if body.get("store") is True:
        raise InvalidRequest("'store': true is not supported: this platform keeps no responses; leave it unset "
                             "or false", param="store")
