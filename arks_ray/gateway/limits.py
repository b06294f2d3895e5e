"""Rate-limit and quota policy: which counters a request touches, and by how much. Pure.

Called by the ingress once per request to build the ``Counter`` list that a ``CounterStore`` reserves in
one atomic step, and again at the end to compute what to settle. Window and period maths live here, with
the clock passed in, so they are property-tested without a store.

Semantics (Arks' keys: rate limits per token per endpoint, quotas per ArksQuota object):

- rpm/rph/rpd count requests, tpm/tph/tpd tokens (prompt + completion), over a window W.
  ``slidingWindow`` (default) keeps W/60 buckets and counts the last 60 plus the current one, so no
  interval of length W ever admits more than the limit; a request may be refused up to W/60 early.
  ``fixedWindow`` counts one bucket aligned to UTC boundaries (Arks' behaviour, with its 2x edge burst).
- concurrency counts requests in flight (leases that expire if a replica dies mid-request).
- quotas count prompt, response or total tokens, or cost in integer micro-units, per period
  (lifetime, or the current UTC day or month).
- Admission reserves an estimate (prompt estimate + max_tokens); settlement replaces it with actual usage.
  A limit of 0 blocks everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from arks_ray.api.endpoint import Pricing
from arks_ray.api.gateway import Grant, Quota, Token
from arks_ray.api.quota import period_end, period_id

Kind = Literal["window", "lease", "total"]
Dimension = Literal["requests", "tokens", "quota"]
Algorithm = Literal["slidingWindow", "fixedWindow"]

WINDOWS_MS: dict[str, int] = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}
SLIDING_BUCKETS = 60
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4


@dataclass(frozen=True)
class Counter:
    """One counter a request reserves against."""

    key: str
    kind: Kind
    limit: int
    amount: int
    label: str
    dimension: Dimension
    bucket_ms: int = 0
    span: int = 0
    """Buckets counted before the current one (0 for a fixed window)."""
    ttl_ms: int = 0
    """Key expiry (window: W + bucket; lease: the lease; total: to the period's end; 0: none)."""


@dataclass(frozen=True)
class Usage:
    """What a request actually used."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def window_counter(prefix: str, rule: str, limit: int, amount: int, algorithm: Algorithm) -> Counter:
    window = WINDOWS_MS[rule[-1]]
    if algorithm == "fixedWindow":
        bucket, span = window, 0
    else:
        bucket, span = window // SLIDING_BUCKETS, SLIDING_BUCKETS
    return Counter(key=f"{prefix}:{rule}", kind="window", limit=limit, amount=amount, label=rule,
                   dimension="requests" if rule.startswith("r") else "tokens", bucket_ms=bucket, span=span,
                   ttl_ms=window + bucket)


def cost_micro(pricing: Pricing | None, prompt: int, completion: int) -> int:
    """Cost in integer micro-units, rounded up per request (prices are per million tokens)."""
    if pricing is None:
        return 0
    raw = prompt * pricing.prompt_per_million + completion * pricing.completion_per_million
    return -(-raw // 1_000_000)


def quota_amount(kind: str, pricing: Pricing | None, prompt: int, completion: int) -> int:
    if kind == "prompt":
        return prompt
    if kind == "response":
        return completion
    if kind == "total":
        return prompt + completion
    return cost_micro(pricing, prompt, completion)


def quota_key(namespace: str, quota: str, kind: str, period: str, now: float, prefix: str = "arks") -> str:
    return f"{prefix}:{namespace}:quota:{quota}:{kind}:{period_id(period, now)}"


def counters_for(
    *,
    namespace: str,
    token: Token,
    grant: Grant,
    quota: Quota | None,
    pricing: Pricing | None,
    estimate: Usage,
    now: float,
    algorithm: Algorithm = "slidingWindow",
    lease_ms: int = 900_000,
    prefix: str = "arks",
) -> list[Counter]:
    """Every counter one request reserves, with the estimated amounts."""
    base = f"{prefix}:{namespace}:rl:{token.name}:{grant.endpoint}"
    out: list[Counter] = []
    for limit in grant.rate_limits:
        if limit.type == "concurrency":
            out.append(Counter(key=f"{base}:concurrency", kind="lease", limit=limit.value, amount=1,
                               label="concurrency", dimension="requests", ttl_ms=lease_ms))
        else:
            amount = 1 if limit.type.startswith("r") else estimate.total_tokens
            out.append(window_counter(base, limit.type, limit.value, amount, algorithm))
    if quota is not None:
        end = period_end(quota.period, now)
        ttl = 0 if end is None else int((end - now) * 1000) + 86_400_000
        for budget in quota.budgets:
            out.append(Counter(
                key=quota_key(namespace, quota.name, budget.type, quota.period, now, prefix), kind="total",
                limit=budget.value,
                amount=quota_amount(budget.type, pricing, estimate.prompt_tokens, estimate.completion_tokens),
                label=f"quota {quota.name} ({budget.type})", dimension="quota", ttl_ms=ttl))
    return out


def settled_amounts(counters: list[Counter], usage: Usage, pricing: Pricing | None) -> list[int]:
    """What each reserved counter is finally charged."""
    out = []
    for c in counters:
        if c.kind == "lease":
            out.append(0)
        elif c.dimension == "requests":
            out.append(1)
        elif c.dimension == "tokens":
            out.append(usage.total_tokens)
        else:
            kind = c.key.rsplit(":", 2)[-2]
            out.append(quota_amount(kind, pricing, usage.prompt_tokens, usage.completion_tokens))
    return out


def _text_len(value: Any) -> int:
    """Characters of text in a prompt, message content or input (iterative: bodies may nest deeply)."""
    total, todo = 0, [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.append(item.get("text") or item.get("content") or "")
    return total


def estimate_usage(kind: str, body: dict[str, Any], default_max_tokens: int) -> Usage:
    """A cheap upper-ish estimate without a tokenizer: ~4 characters per token, plus max_tokens."""
    if kind == "chat":
        given = body.get("messages")
        messages: list[Any] = given if isinstance(given, list) else []
        chars = sum(_text_len(m.get("content")) for m in messages if isinstance(m, dict))
        prompt = math.ceil(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * len(messages)
    elif kind == "completions":
        prompt = math.ceil(_text_len(body.get("prompt")) / CHARS_PER_TOKEN)
    elif kind == "responses":
        prompt = math.ceil(_text_len(body.get("input")) / CHARS_PER_TOKEN) + \
            math.ceil(_text_len(body.get("instructions")) / CHARS_PER_TOKEN)
    else:
        prompt = math.ceil(_text_len(body.get("input")) / CHARS_PER_TOKEN)
        return Usage(prompt_tokens=max(prompt, 1))
    requested = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    completion = requested if isinstance(requested, int) and requested > 0 else default_max_tokens
    # Every choice (n) and every prompt of a batch generates up to max_tokens.
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    prompts = body.get("prompt")
    batch = len(prompts) if kind == "completions" and isinstance(prompts, list) and prompts \
        and not all(isinstance(p, int) for p in prompts) else 1
    return Usage(prompt_tokens=max(prompt, 1), completion_tokens=completion * choices * batch)


def usage_from(payload: dict[str, Any] | None, fallback_prompt: int, counted_completion: int) -> Usage:
    """Actual usage from an engine's usage object; when absent (failure, disconnect), what was counted."""
    if isinstance(payload, dict) and isinstance(payload.get("prompt_tokens"), int):
        return Usage(int(payload["prompt_tokens"]), int(payload.get("completion_tokens") or 0))
    if isinstance(payload, dict) and isinstance(payload.get("input_tokens"), int):  # the Responses API's names
        return Usage(int(payload["input_tokens"]), int(payload.get("output_tokens") or 0))
    return Usage(fallback_prompt, counted_completion)


def format_reset(ms: int) -> str:
    """OpenAI's reset format: '1s', '6m0s', '1h2m3s'."""
    seconds = max(0, math.ceil(ms / 1000))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def window_used(buckets: dict[int, int], now_ms: int, bucket_ms: int, span: int) -> int:
    """Sum of the buckets a window counter counts at ``now_ms`` (the current one and ``span`` before it)."""
    cur = now_ms // bucket_ms
    return sum(v for idx, v in buckets.items() if cur - span <= idx <= cur)


def window_retry_after_ms(buckets: dict[int, int], now_ms: int, bucket_ms: int, span: int, limit: int,
                          amount: int) -> int:
    """How long until ``amount`` more fits under ``limit``; -1 if it never can (amount > limit)."""
    if amount > limit:
        return -1
    cur = now_ms // bucket_ms
    for k in range(1, span + 2):
        counted = sum(v for idx, v in buckets.items() if cur + k - span <= idx <= cur)
        if counted + amount <= limit:
            return (cur + k) * bucket_ms - now_ms
    return (cur + span + 1) * bucket_ms - now_ms


def window_reset_ms(buckets: dict[int, int], now_ms: int, bucket_ms: int, span: int) -> int:
    """How long until the window is empty again (OpenAI's x-ratelimit-reset-*)."""
    cur = now_ms // bucket_ms
    live = [idx for idx, v in buckets.items() if cur - span <= idx <= cur and v > 0]
    return (max(live) + span + 1) * bucket_ms - now_ms if live else 0
