"""Kubernetes-safe names for rendered objects: DNS-1123 labels of at most 63 characters.

Called by every renderer that makes a name from user input. A name that would be too long keeps a
readable prefix and ends in a short hash of the whole, so distinct inputs stay distinct.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

MAX_LABEL = 63
RAYSERVICE_NAME = "arks"
MANAGED_BY = {"app.kubernetes.io/managed-by": "arks-ray"}
"""The label on every object and pod template arks-ray renders or writes."""
CONTENT_ANNOTATION = "arks.ai/content-id"
"""A digest of what an object holds, so that an unchanged object is not written again."""


def digest(value: Any, length: int = 64) -> str:
    """A stable SHA-256 hex digest of any JSON-able value (keys sorted)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def dns_label(*parts: str, max_len: int = MAX_LABEL) -> str:
    """Join parts into a DNS-1123 label; shorten with a hash suffix when over ``max_len``."""
    raw = "-".join(p for p in parts if p)
    clean = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-") or "x"
    if len(clean) <= max_len and clean == raw:
        return clean
    suffix = digest(raw, 8)
    if len(clean) + 1 + len(suffix) <= max_len and clean != raw:
        return f"{clean}-{suffix}"
    head = clean[: max_len - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}"


def label_value(value: str) -> str:
    """A label value from an object name (a DNS-1123 subdomain, up to 253 characters): at most 63."""
    if len(value) <= MAX_LABEL:
        return value
    return f"{value[: MAX_LABEL - 9].rstrip('-.')}-{digest(value, 8)}"


def model_job_name(model: str) -> str:
    return dns_label("arks-model", model)
