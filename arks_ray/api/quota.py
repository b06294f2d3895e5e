"""ArksQuota: a token budget (or cost budget) shared by every token that references it.

Read by the renderer (limits go to the gateway) and the controller (usage is mirrored into status).
``period`` and the ``cost`` type are extensions; Arks quotas are lifetime token counts.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, model_validator

from arks_ray.api.common import Condition, ObjectMeta, Spec, Status, require_unique

QuotaType = Literal["prompt", "response", "total", "cost"]
QuotaPeriod = Literal["lifetime", "daily", "monthly"]


class QuotaLimit(Spec):
    """One budget."""

    type: QuotaType = Field(description="prompt, response or total tokens, or cost (micro-units).")
    value: int = Field(ge=0, description="The budget for one period.")


class ArksQuotaSpec(Spec):
    """Desired state of an ArksQuota."""

    quotas: list[QuotaLimit] = Field(min_length=1, description="Budgets; each type at most once.")
    period: QuotaPeriod = Field("lifetime", description="lifetime (Arks), daily or monthly, in UTC.")

    @model_validator(mode="after")
    def _unique(self) -> ArksQuotaSpec:
        require_unique([q.type for q in self.quotas], "quotas[{i}].type")
        return self


class QuotaUsage(Status):
    """Usage of one budget."""

    type: str = Field(description="The budget type.")
    used: int = Field(0, description="Used in the current period.")
    last_update_time: dt.datetime | None = Field(None, description="When this was last written.")


class ArksQuotaStatus(Status):
    """Observed state of an ArksQuota."""

    quota_status: list[QuotaUsage] = Field(default_factory=list, description="Usage per type.")
    period_start: dt.datetime | None = Field(None, description="Start of the current period (UTC).")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")


class ArksQuota(Spec):
    """A shared budget (ArksQuota, arks.ai/v1)."""

    api_version: Literal["arks.ai/v1"] = Field("arks.ai/v1", description="arks.ai/v1")
    kind: Literal["ArksQuota"] = Field("ArksQuota", description="ArksQuota")
    metadata: ObjectMeta
    spec: ArksQuotaSpec
    status: ArksQuotaStatus | None = None


def period_id(period: str, now: float) -> str:
    """The UTC period containing ``now``: 'lifetime', 'YYYY-MM-DD' (daily) or 'YYYY-MM' (monthly)."""
    if period == "lifetime":
        return "lifetime"
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    return day.strftime("%Y-%m-%d") if period == "daily" else day.strftime("%Y-%m")


def period_end(period: str, now: float) -> float | None:
    """Unix time when the current period ends (None for lifetime)."""
    if period == "lifetime":
        return None
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "daily":
        start = day.replace(hour=0, minute=0, second=0, microsecond=0)
        return (start + dt.timedelta(days=1)).timestamp()
    first = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
    return nxt.timestamp()
