"""Reading download progress: the last ``arks-progress`` report in a running download Job's log.

Called by ``controller.reconcile.observe`` for the download Jobs that are still running; the pure
planner (``controller.downloads``) turns the report into ``ArksModel.status.progress`` and
``status.download``. Each read is one pod list (by the ``job-name`` label Kubernetes puts on a Job's
pods) and one log tail. A failure to read is not an error: the status just shows no progress.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from controller import errors
from controller.kube import KubeClient
from controller.meta import meta, name_of

logger = logging.getLogger(__name__)
TAIL_LINES = 20


def running(job: Mapping[str, Any]) -> bool:
    status = job.get("status") or {}
    finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in status.get("conditions") or [])
    return not finished and not meta(job).get("deletionTimestamp")


async def _log_of(kube: KubeClient, ns: str, job: str) -> tuple[str, str | None]:
    try:
        pods = await kube.list("Pod", ns, {"job-name": job})
        live = [p for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")]
        if not live:
            return job, None
        newest = max(live, key=lambda p: str(meta(p).get("creationTimestamp") or ""))
        return job, await kube.log_tail(ns, name_of(newest), TAIL_LINES)
    except errors.ControllerError as exc:
        logger.debug("no progress for Job %s/%s: %s", ns, job, exc)
        return job, None


async def download_logs(kube: KubeClient, ns: str, jobs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Log tails of the running download Jobs' newest pods, by Job name."""
    found = await asyncio.gather(*(_log_of(kube, ns, name_of(j)) for j in jobs if running(j)))
    return {job: log for job, log in found if log}
