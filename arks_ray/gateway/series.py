"""What one finished request becomes in the gateway's metrics: bounded label sets and the values. Pure.

Called by ``deployments.gateway_metrics.ServeMetrics.finished`` for every ``RequestRecord``; the Serve
side only hands the samples to ``ray.serve.metrics``. Keeping the mapping here means the label rules
and the derived latencies (TPOT) are tested without Ray.

Cardinality is bounded by construction:

- ``namespace`` is the gateway's own (one per RayService);
- ``endpoint`` and ``backend`` are names from the gateway's config (the record leaves them empty for a
  model that is not configured), so they are bounded by the config;
- ``token`` is an ArksToken *name*, never a value. Each replica labels at most ``max_tokens`` distinct
  names; requests of any later name are counted under ``OTHER`` (``"_other"``, not a valid Kubernetes
  name, so it cannot collide with a real token). Empty (not yet authenticated) reads ``"_none"``;
- ``outcome``, ``code``, ``type`` and ``reason`` come from small fixed sets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from arks_ray.api.gateway import GatewayConfig
from arks_ray.gateway.records import RequestRecord

OTHER = "_other"
NONE = "_none"
TENANT_LABELS = ("namespace", "endpoint", "backend", "token")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
OVERHEAD_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_CODES = frozenset({200, 201, 400, 401, 403, 404, 408, 409, 413, 422, 429, 499, 500, 502, 503, 504})
_REASON = re.compile(r"^(rpm|rph|rpd|tpm|tph|tpd|concurrency|quota)$")


class TokenNames:
    """Token names as label values, at most ``limit`` distinct ones per replica (then ``OTHER``).

    First come, first kept: a name once labelled keeps its own series for the replica's life, so a
    tenant's counters never move between series."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self.overflowed = 0
        """Requests labelled ``OTHER`` because the cap was reached."""

    def label(self, name: str) -> str:
        if not name:
            return NONE
        if name in self._seen:
            return name
        if len(self._seen) < self.limit:
            self._seen.add(name)
            return name
        self.overflowed += 1
        return OTHER


def status_code(status: int) -> str:
    """The ``code`` label: the status itself when it is a common one, else its class (``5xx``)."""
    return str(status) if status in _CODES else f"{status // 100}xx"


def refusal_reason(record: RequestRecord) -> str | None:
    """Why a 429 was given (``rpm``, ``tpm``, ``concurrency``, ``quota``...), None if not refused."""
    if record.outcome not in ("limited", "quota"):
        return None
    if record.outcome == "quota":
        return "quota"
    return record.limit if _REASON.match(record.limit) else "rate_limit"


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first, for streams with at least two tokens."""
    if not record.stream or record.ttft_s is None or record.completion_tokens < 2:
        return None
    return max(0.0, record.duration_s - record.ttft_s) / (record.completion_tokens - 1)


@dataclass(frozen=True)
class Samples:
    """Everything one record adds to the metrics; ``None`` or 0 means "nothing to add"."""

    tenant: dict[str, str]
    outcome: str
    code: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    refused: str | None
    ttft_s: float | None
    tpot_s: float | None
    duration_s: float | None
    gateway_s: float | None


def samples(record: RequestRecord, tokens: TokenNames) -> Samples:
    """The samples of one finished request. Latencies only for requests a backend answered."""
    tenant = {"namespace": record.namespace or NONE, "endpoint": record.endpoint or NONE,
              "backend": record.backend or NONE, "token": tokens.label(record.token)}
    answered = bool(record.backend) and record.ttft_s is not None
    return Samples(
        tenant=tenant, outcome=record.outcome, code=status_code(record.status),
        prompt_tokens=max(0, record.prompt_tokens), completion_tokens=max(0, record.completion_tokens),
        cost=max(0.0, record.cost), refused=refusal_reason(record),
        ttft_s=record.ttft_s if answered else None, tpot_s=tpot_s(record) if answered else None,
        duration_s=record.duration_s if answered else None,
        gateway_s=record.gateway_s if record.backend else None)


@dataclass(frozen=True)
class QuotaLevel:
    """One budget of one ArksQuota: what is used in the current period against its limit."""

    quota: str
    type: str
    used: int
    limit: int


def quota_levels(config: GatewayConfig, usage: Mapping[str, Mapping[str, int]]) -> list[QuotaLevel]:
    """Every budget of the config's quotas with its usage (``Governor.usage``); missing usage reads 0."""
    return [QuotaLevel(q.name, b.type, int(usage.get(q.name, {}).get(b.type, 0)), b.value)
            for q in config.quotas for b in q.budgets]
