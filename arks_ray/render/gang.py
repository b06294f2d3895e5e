"""Gang scheduling: Arks' ``podGroupPolicy`` onto KubeRay v1.7's batch-scheduler integration. Pure.

Called by ``arks_ray.render.rayservice``, which puts the labels on the RayService; KubeRay copies them to
the RayCluster it builds, and its batch scheduler (one per KubeRay install: ``batchScheduler`` in
KubeRay's own settings, named to us by ``RenderOptions.gang_scheduler``) reads them there:

- **volcano**: every RayCluster gets a PodGroup (minMember = head + the workers' ``minReplicas``, as
  autoscaling is on); ``volcano.sh/queue-name`` and ``ray.io/priority-class-name`` set its queue and
  priority class. KubeRay needs no opt-in label.
- **scheduler-plugins** (kubernetes-sigs coscheduling, Arks' ``kubeScheduling``): a PodGroup only for a
  RayCluster labelled ``ray.io/gang-scheduling-enabled``; KubeRay sets no timeout on it.
- **yunikorn**: task groups for a RayCluster labelled ``ray.io/gang-scheduling-enabled``, in the
  application named by ``yunikorn.apache.org/app-id``.

KubeRay gangs a whole RayCluster, and there is one per namespace: the pods of every app's minimum
replicas are placed all or nothing together. Pods the Ray autoscaler adds above the minimum are not
gang-scheduled by any of the three (KubeRay computes the PodGroup from ``minReplicas``); within Ray, a
replica's placement group is still reserved whole. Whatever a policy asks that cannot be honoured is a
warning naming the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from arks_ray.api.application import ArksApplication
from arks_ray.api.disaggregated import ArksDisaggregatedApplication
from arks_ray.errors import Problem
from arks_ray.render.names import label_value
from arks_ray.render.options import GangScheduler

GANG_ENABLED = "ray.io/gang-scheduling-enabled"
PRIORITY_CLASS = "ray.io/priority-class-name"
VOLCANO_QUEUE = "volcano.sh/queue-name"
YUNIKORN_APP_ID = "yunikorn.apache.org/app-id"
FIELD = "spec.podGroupPolicy"

AnyApp = ArksApplication | ArksDisaggregatedApplication


def _warn(app: AnyApp, path: str, message: str) -> Problem:
    return Problem(app.kind, app.metadata.name, path, message, "warning")


def gang_labels(apps: Iterable[AnyApp], scheduler: GangScheduler, namespace: str,
                previous: Mapping[str, Any] | None = None) -> tuple[dict[str, str], list[Problem]]:
    """RayService labels for the namespace's gang, and a warning for each policy field not honoured.

    ``previous`` is the live RayService: its labels tell whether the running RayCluster has the gang
    already (KubeRay copies labels only into a RayCluster it builds)."""
    labels: dict[str, str] = {}
    problems: list[Problem] = []
    wanting = [a for a in apps if a.spec.pod_group_policy is not None]
    for app in wanting:
        policy = app.spec.pod_group_policy
        assert policy is not None
        kube, volcano = policy.kube_scheduling, policy.volcano_scheduling
        if scheduler == "none":
            problems.append(_warn(app, FIELD, "not honoured: this installation runs KubeRay without a batch "
                                              "scheduler (chart value gangScheduling.scheduler is none)"))
            continue
        if kube is not None and "schedule_timeout_seconds" in kube.model_fields_set:
            problems.append(_warn(app, f"{FIELD}.kubeScheduling.scheduleTimeoutSeconds",
                                  "not honoured: KubeRay v1.7 creates the PodGroup without a schedule timeout"))
        if kube is not None and scheduler != "scheduler-plugins":
            problems.append(_warn(app, f"{FIELD}.kubeScheduling", f"KubeRay runs with {scheduler}; the "
                                  f"pods are gang-scheduled by {scheduler} instead of scheduler-plugins"))
        if volcano is not None and scheduler != "volcano":
            problems.append(_warn(app, f"{FIELD}.volcanoScheduling", f"KubeRay runs with {scheduler}; the "
                                  f"pods are gang-scheduled by {scheduler}, without the Volcano queue "
                                  "and priority class"))
        if volcano is not None and scheduler == "volcano":
            for key, value, path in ((VOLCANO_QUEUE, volcano.queue, "queue"),
                                     (PRIORITY_CLASS, volcano.priority_class_name, "priorityClassName")):
                if not value:
                    continue
                if labels.setdefault(key, label_value(value)) != label_value(value):
                    problems.append(_warn(app, f"{FIELD}.volcanoScheduling.{path}",
                                          f"not honoured: one PodGroup serves the namespace, and another app "
                                          f"set {labels[key]!r} first (apps in name order)"))
        if scheduler in ("scheduler-plugins", "yunikorn"):
            labels[GANG_ENABLED] = "true"
        if scheduler == "yunikorn":
            labels[YUNIKORN_APP_ID] = label_value(f"{namespace}-arks")
    if wanting and scheduler != "none" and previous is not None:
        live = ((previous.get("metadata") or {}).get("labels") or {})
        if any(live.get(k) != v for k, v in labels.items()):
            for app in wanting:
                problems.append(_warn(app, FIELD, "takes effect when KubeRay next builds this namespace's "
                                                  "RayCluster: it copies labels only into a new one"))
    return labels, problems
