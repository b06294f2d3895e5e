"""The gateway's Secret in each tenant namespace: its token keys and the Redis password. Pure.

Called by ``controller.plans``. The RayService's head pod reads this Secret through ``secretKeyRef``
(``arks_ray.render.rayservice``), so nothing secret is ever in the RayService or its Serve config. The
token keys are the namespace's, derived one-way from the installation key (``TokenKeys.for_namespace``):
a tenant who may read Secrets in its namespace can digest its own tokens, nobody else's.

The live Secret is never read back for its values: an annotation holds a keyed fingerprint of the
content, so an unchanged namespace writes nothing, and a rotated key or password rewrites it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from arks_ray.api.digests import TokenKeys
from arks_ray.render.names import CONTENT_ANNOTATION
from controller.meta import MANAGED_BY
from controller.writes import Write, apply_changed


def gateway_secret(namespace: str, name: str, keys: TokenKeys | None, redis_password: str | None
                   ) -> dict[str, Any] | None:
    """The Secret to apply, or None when there is nothing to put in it (no key configured)."""
    if keys is None:
        return None
    mine = keys.for_namespace(namespace)
    data = {"token-key": mine.current.decode()}
    if mine.next is not None:
        data["token-key-next"] = mine.next.decode()
    if redis_password:
        data["redis-password"] = redis_password
    blob = "\n".join(f"{k}={v}" for k, v in sorted(data.items())).encode()
    content = hmac.new(mine.current, blob, hashlib.sha256).hexdigest()[:16]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY),
                     "annotations": {CONTENT_ANNOTATION: content}},
        "type": "Opaque",
        "stringData": data,
    }


def secret_write(desired: dict[str, Any] | None, live: Mapping[str, Any] | None, namespace: str,
                 name: str) -> Write | None:
    """Apply the Secret when it is missing or its content id differs."""
    return apply_changed(desired, live, namespace, name) if desired is not None else None
