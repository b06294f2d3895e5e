"""LoRA adapters of an ArksApplication (``spec.lora``) in its rendered Serve application.

Called by ``arks_ray.render.rayservice`` after the engine app is rendered. Three things change:

- the engine: vLLM's ``enable_lora``, ``max_lora_rank`` and ``max_loras``, and Ray Serve LLM's
  ``lora_config`` (which turns on Serve model multiplexing: a request's multiplexed model id selects
  the adapter, and replicas that have it loaded are preferred);
- the adapter table, ``{"<served name>:<adapter>": path}``, goes in the engine deployment's Serve
  ``user_config``, not in the app's ``args``: Serve applies a changed ``user_config`` to live replicas
  (``reconfigure``) and gives it to new ones, while changed ``args`` would rebuild and restart every
  replica. Adding or removing an adapter therefore never restarts the engine;
- each adapter's weights are an ArksModel (its own source and storage); in a cluster it must share the
  base model's PVC, which the engine pods mount (another volume would change the worker group).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arks_ray.api.application import ArksApplication
from arks_ray.api.model import ArksModel
from arks_ray.errors import Problem
from arks_ray.render.options import RenderOptions
from arks_ray.render.serve_config import model_source

ENGINE_PREFIX = "arks-engine:"
"""The name prefix of every engine deployment (``deployments.vllm_engine``, ``deployments.sglang_engine``)."""


def engine_deployment_name(model_id: str) -> str:
    """The name Ray's ``build_llm_deployment`` gives the engine deployment of ``model_id``."""
    return ENGINE_PREFIX + model_id.replace("/", "--").replace(".", "_")


def adapter_id(served_name: str, adapter: str) -> str:
    """The model name clients send for an adapter, also its LoRA name in vLLM and its multiplexed id."""
    return f"{served_name}:{adapter}"


def adapter_paths(app: ArksApplication, models: Mapping[str, ArksModel], namespace: str,
                  options: RenderOptions) -> tuple[dict[str, str], list[Problem]]:
    """Each adapter's id and where the engine loads it from; an adapter that cannot be served is left out
    with a warning (the base model and the other adapters still are)."""
    lora = app.spec.lora
    if lora is None:
        return {}, []
    name = app.metadata.name
    base = models.get(app.spec.model.name)
    out: dict[str, str] = {}
    problems: list[Problem] = []
    for i, adapter in enumerate(lora.adapters):
        field = f"spec.lora.adapters[{i}].model.name"
        model = models.get(adapter.model.name)
        if model is None:
            problems.append(Problem("ArksApplication", name, field,
                                    f"ArksModel {adapter.model.name!r} not found; adapter {adapter.name!r} "
                                    "is not served", "warning"))
            continue
        pvc = model.pvc_name()
        if not options.local and pvc is not None and base is not None and pvc != base.pvc_name():
            problems.append(Problem("ArksApplication", name, field,
                                    f"ArksModel {model.metadata.name!r} is on PVC {pvc!r}, not on the base model's "
                                    f"{base.pvc_name()!r} that the engine pods mount; adapter {adapter.name!r} "
                                    "is not served", "warning"))
            continue
        out[adapter_id(app.spec.model_name, adapter.name)] = model_source(model, namespace, options)
    return out, problems


def apply_lora(rendered: dict[str, Any], app: ArksApplication, models: Mapping[str, ArksModel], namespace: str,
               options: RenderOptions) -> list[Problem]:
    """Turn on LoRA in a rendered vLLM engine app and give its deployment the adapter table."""
    lora = app.spec.lora
    if lora is None:
        return []
    paths, problems = adapter_paths(app, models, namespace, options)
    llm_config = rendered["args"]["llm_config"]
    llm_config["engine_kwargs"].update(
        enable_lora=True, max_lora_rank=lora.max_rank, max_loras=lora.max_adapters_per_replica)
    llm_config["lora_config"] = {"max_num_adapters_per_replica": lora.max_adapters_per_replica}
    rendered["deployments"] = [{
        "name": engine_deployment_name(app.spec.model_name),
        "user_config": {"adapters": dict(sorted(paths.items()))},
    }]
    return problems
