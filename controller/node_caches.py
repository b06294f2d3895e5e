"""The preload DaemonSets of node-cached models (``spec.cache.nodeLocal.preload``). Pure.

Called by ``controller.plans`` with the rendered DaemonSets (``arks_ray.render.node_cache``), the live
ones (listed by the managed-by label) and the models' states:

- A model's DaemonSet is applied (server-side) once the model is Ready: its init container copies from
  the claim and refuses a model whose download has not finished, so an earlier DaemonSet would only
  crash-loop. It is applied again only when what was rendered changed (a hash in an annotation), and
  it carries the model as its controlling owner, so deleting the model removes it.
- A live managed DaemonSet of a model that no longer renders one (preload off, tier removed, model
  gone) is deleted.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from arks_ray.render.names import digest, label_value
from controller.meta import annotation, meta, name_of, owner_ref
from controller.status import ModelState
from controller.writes import Write

HASH = "arks.ai/spec-hash"
MODEL_LABEL = "arks.ai/model"


def plan_node_caches(ns: str, models: Mapping[str, Mapping[str, Any]], states: Mapping[str, ModelState],
                     rendered: Sequence[Mapping[str, Any]], live: Sequence[Mapping[str, Any]]) -> list[Write]:
    """Writes for the preload DaemonSets of one namespace. ``models`` are the live ArksModels by name."""
    live_by_name = {name_of(d): d for d in live}
    wanted = {name_of(d): d for d in rendered if d.get("kind") == "DaemonSet"}
    writes: list[Write] = []
    for model_name, raw in sorted(models.items()):
        state = states.get(model_name)
        for name, ds in sorted(wanted.items()):
            if (meta(ds).get("labels") or {}).get(MODEL_LABEL) != label_value(model_name):
                continue
            if state is None or not state.ready:
                continue  # the copy step needs a finished download
            want = digest(ds["spec"], 16)
            current = live_by_name.get(name)
            if current is not None and annotation(current, HASH) == want:
                continue
            body = copy.deepcopy(dict(ds))
            body["metadata"]["annotations"] = {**body["metadata"].get("annotations", {}), HASH: want}
            ref = owner_ref(raw, controller=True)
            if ref:
                body["metadata"]["ownerReferences"] = [ref]
            writes.append(Write("apply", "DaemonSet", ns, name, body,
                                "preload the node cache" if current is None else "node cache changed"))
    for name, current in sorted(live_by_name.items()):
        if name not in wanted and (meta(current).get("labels") or {}).get(MODEL_LABEL):
            writes.append(Write("delete", "DaemonSet", ns, name, why="no node-cache preload any more"))
    return writes
