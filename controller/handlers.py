"""kopf glue: every event of every watched kind schedules one reconcile of its namespace. Nothing else.

``register`` is called by ``controller.runtime.run`` on a fresh ``kopf.OperatorRegistry`` (tests do the
same against the emulator). There are no create/update/delete handlers: kopf's change detection is
edge-triggered and needs its own annotations; the reconcile is level-triggered and reads everything
itself, so an event only says *which namespace* to look at. Watched:

- the six Arks kinds (spec changes, deletions, and our own status writes, which end in a no-op);
- RayServices, Jobs and PVCs labelled ``app.kubernetes.io/managed-by: arks-ray`` (status changes);
- Secrets a token reads its value from (rotation), unless ``settings.watch_secrets`` is off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import kopf
import kubernetes.client

from controller.kube import ARKS_KINDS, RESOURCES
from controller.meta import MANAGED_BY

if TYPE_CHECKING:
    from controller.runtime import Runtime

PRIORITY = 100
"""Priority of the operator's login (above kopf's fallbacks, which it makes unnecessary)."""


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials, from the same client configuration the operator's own client uses."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        priority=PRIORITY,
    )


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    """Add the operator's handlers to ``registry``."""
    scheduler = runtime.scheduler

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(runtime.configuration)

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        scheduler.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        # Before kopf sweeps leftover tasks: our workers stop cleanly, and the client's keep-alive
        # connections are closed rather than abandoned.
        await runtime.close()

    async def changed(namespace: str | None, **_: Any) -> None:
        if namespace:
            scheduler.schedule(namespace)

    for kind in ARKS_KINDS:
        res = RESOURCES[kind]
        kopf.on.event(res.group, res.version, res.plural, id=f"arks-{res.plural}", registry=registry)(changed)
    for kind in ("RayService", "Job", "PersistentVolumeClaim"):
        res = RESOURCES[kind]
        kopf.on.event(res.group, res.version, res.plural, id=f"child-{res.plural}", labels=dict(MANAGED_BY),
                      registry=registry)(changed)
    if runtime.settings.watch_secrets:
        def referenced(namespace: str | None, name: str, **_: Any) -> bool:
            return bool(namespace) and scheduler.referenced_secret(str(namespace), name)

        kopf.on.event("", "v1", "secrets", id="token-secrets", when=referenced, registry=registry)(changed)
