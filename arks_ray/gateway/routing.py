"""Backend choice for one request: weighted random over an endpoint's backends.

Called by the ingress per request. ``exclude`` is the seam for retries and for taking failing
backends out of rotation; load- and SLO-aware weights replace ``weight_of`` later without touching
callers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection

from arks_ray.api.gateway import Backend, Endpoint
from arks_ray.errors import BackendUnavailable


def static_weight(backend: Backend) -> float:
    return float(backend.weight)


def choose_backend(
    endpoint: Endpoint,
    rng: random.Random,
    *,
    exclude: Collection[str] = (),
    weight_of: Callable[[Backend], float] = static_weight,
) -> Backend:
    """Pick a backend with probability proportional to its weight; weight 0 means drained."""
    candidates = [(b, weight_of(b)) for b in endpoint.backends if b.name not in exclude]
    candidates = [(b, w) for b, w in candidates if w > 0]
    if not candidates:
        raise BackendUnavailable(f"no backend is available for the model {endpoint.name!r}")
    total = sum(w for _, w in candidates)
    point = rng.random() * total
    for backend, weight in candidates:
        point -= weight
        if point < 0:
            return backend
    return candidates[-1][0]
