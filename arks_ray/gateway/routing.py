"""Backend choice for one request: weighted random over effective weights.

Called by the ingress per request (and again, excluding the failed backend, for its one retry).

    effective weight = configured weight x health factor x SLO factor

- the configured weight is ``defaultWeight`` or the app's ``routeConfigs`` override; 0 drains;
- the health factor is 1 while the backend's circuit breaker admits it, else 0 (``health``);
- the SLO factor comes from the backend's TTFT, TPOT and queue EWMAs (``signals``), rate-limited.

``Router`` keeps that state per backend across reconfigurations and reports it (``snapshot``) for
metrics and ``ArksEndpoint.status``. Pure: the caller passes the time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from arks_ray.api.gateway import Backend, Endpoint
from arks_ray.errors import BackendUnavailable
from arks_ray.gateway.health import Breaker, BreakerSettings, State
from arks_ray.gateway.signals import Signals, Slo, SloSettings, best_of, step, target_factor


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


@dataclass
class BackendState:
    """Everything the router knows of one backend of one endpoint."""

    breaker: Breaker
    signals: Signals = field(default_factory=Signals)


@dataclass(frozen=True)
class RouteView:
    """One backend as reported in metrics and ``ArksEndpoint.status``."""

    endpoint: str
    backend: str
    kind: str
    weight: int
    health: State
    slo_factor: float
    effective_weight: float
    in_flight: int
    ttft_ms: float | None
    tpot_ms: float | None
    reason: str


@dataclass
class Ticket:
    """One request on one backend, from its start to its verdict."""

    endpoint: str
    backend: str
    started: float
    stream: bool
    first_byte: float | None = None
    done: bool = False


class Router:
    """Effective weights and backend choice for every endpoint of one gateway replica."""

    def __init__(self, breaker: BreakerSettings | None = None, slo: SloSettings | None = None) -> None:
        self.breaker_settings = breaker or BreakerSettings()
        self.slo_settings = slo or SloSettings()
        self._state: dict[tuple[str, str], BackendState] = {}

    def state(self, endpoint: str, backend: str) -> BackendState:
        key = (endpoint, backend)
        found = self._state.get(key)
        if found is None:
            found = self._state[key] = BackendState(Breaker(self.breaker_settings))
        return found

    def retain(self, endpoints: Collection[Endpoint]) -> None:
        """Forget backends that left the configuration (keep the others' history)."""
        live = {(e.name, b.name) for e in endpoints for b in e.backends}
        for key in [k for k in self._state if k not in live]:
            del self._state[key]

    def weights(self, endpoint: Endpoint, now: float) -> dict[str, float]:
        """Effective weight of every backend of ``endpoint`` now (advances the SLO factors)."""
        states = [self.state(endpoint.name, b.name) for b in endpoint.backends]
        best = best_of([st.signals for st in states], now, self.slo_settings)
        out: dict[str, float] = {}
        for backend, st in zip(endpoint.backends, states, strict=True):
            slo = Slo(backend.slo_ttft_ms, backend.slo_tpot_ms)
            target, reason = target_factor(st.signals, slo, best, now, self.slo_settings)
            factor = step(st.signals, target, reason, now, self.slo_settings)
            healthy = 1.0 if st.breaker.available(now) else 0.0
            out[backend.name] = backend.weight * healthy * factor
        return out

    def choose(self, endpoint: Endpoint, rng: random.Random, now: float, exclude: Collection[str] = ()) -> Backend:
        """A backend by effective weight. When every backend is out of rotation, try them anyway by
        configured weight (Envoy's panic routing): a certain 503 is worse than a likely one, and it is
        how a backend that just came up (before its next health check) gets its first request."""
        weights = self.weights(endpoint, now)
        try:
            return choose_backend(endpoint, rng, exclude=exclude, weight_of=lambda b: weights[b.name])
        except BackendUnavailable:
            pass
        try:
            return choose_backend(endpoint, rng, exclude=exclude)
        except BackendUnavailable:
            raise BackendUnavailable(self._why_none(endpoint, now, exclude)) from None

    def _why_none(self, endpoint: Endpoint, now: float, exclude: Collection[str]) -> str:
        if not endpoint.backends:
            return f"no backend serves the model {endpoint.name!r}"
        down = [f"{b.name} ({self.state(endpoint.name, b.name).breaker.reason or 'recovering'})"
                for b in endpoint.backends if b.weight > 0 and b.name not in exclude
                and not self.state(endpoint.name, b.name).breaker.available(now)]
        if down:
            return f"no backend is available for the model {endpoint.name!r}: failing: {', '.join(down)}"
        return f"no backend is available for the model {endpoint.name!r}"

    # --- one request's life ------------------------------------------------------------------------

    def start(self, endpoint: str, backend: str, now: float, stream: bool) -> Ticket:
        st = self.state(endpoint, backend)
        st.breaker.on_start(now)
        st.signals.in_flight += 1
        return Ticket(endpoint, backend, now, stream)

    def first_byte(self, ticket: Ticket, now: float) -> None:
        if ticket.first_byte is None:
            ticket.first_byte = now
            if ticket.stream:
                st = self.state(ticket.endpoint, ticket.backend)
                st.signals.ttft_ms.add((now - ticket.started) * 1000, now, self.slo_settings.alpha)

    def succeeded(self, ticket: Ticket, now: float, completion_tokens: int = 0) -> None:
        """The backend answered (a client error is an answer too)."""
        if not self._end(ticket):
            return
        st = self.state(ticket.endpoint, ticket.backend)
        st.breaker.on_success(now)
        if ticket.stream and ticket.first_byte is not None and completion_tokens > 1:
            tpot = (now - ticket.first_byte) * 1000 / (completion_tokens - 1)
            st.signals.tpot_ms.add(tpot, now, self.slo_settings.alpha)

    def failed(self, ticket: Ticket, now: float, reason: str) -> None:
        """The backend failed this request (an exception, a 5xx, a broken stream)."""
        if self._end(ticket):
            self.state(ticket.endpoint, ticket.backend).breaker.on_failure(now, reason)

    def released(self, ticket: Ticket, now: float) -> None:
        """The request ended with no verdict on the backend (the client left)."""
        if self._end(ticket):
            self.state(ticket.endpoint, ticket.backend).breaker.on_release(now)

    def _end(self, ticket: Ticket) -> bool:
        if ticket.done:
            return False
        ticket.done = True
        st = self._state.get((ticket.endpoint, ticket.backend))
        if st is None:  # reconfigured away meanwhile
            return False
        st.signals.in_flight = max(0, st.signals.in_flight - 1)
        return True

    def health_check(self, endpoint: str, backend: str, now: float, ok: bool, reason: str = "") -> None:
        self.state(endpoint, backend).breaker.on_health_check(now, ok, reason)

    def snapshot(self, endpoints: Collection[Endpoint], now: float) -> list[RouteView]:
        out: list[RouteView] = []
        for endpoint in endpoints:
            weights = self.weights(endpoint, now)
            for b in endpoint.backends:
                st = self.state(endpoint.name, b.name)
                sig = st.signals
                health = st.breaker.view(now)
                out.append(RouteView(
                    endpoint=endpoint.name, backend=b.name, kind=b.kind, weight=b.weight, health=health,
                    slo_factor=round(sig.factor, 4), effective_weight=round(weights[b.name], 4),
                    in_flight=sig.in_flight, ttft_ms=sig.ttft_ms.fresh(now, self.slo_settings.stale_s),
                    tpot_ms=sig.tpot_ms.fresh(now, self.slo_settings.stale_s),
                    reason=st.breaker.reason if health != "closed" else sig.reason))
        return out
