"""Which vLLM executor runs an engine's model: in vLLM's EngineCore process, or in Ray workers.

Used by the vLLM engine deployment (``deployments.vllm_engine``), which acts on the choice, and by the
renderer (``arks_ray.render.serve_config``), which refuses an impossible one before anything is applied.

``vllm serve`` on one GPU runs the model inside its EngineCore process (vLLM's ``uni`` executor). Ray's
LLM serving puts every GPU engine under vLLM's Ray executor, one GPU included: one more process, and a Ray
call per engine step between EngineCore and that process. So an engine on one GPU (TP x PP = 1) runs in
process here unless ``--distributed-executor-backend ray`` asks for Ray's; TP x PP > 1 spreads its workers
over the placement group with Ray's executor. CPU engines keep Ray's choice (vLLM's ``mp`` executor, which
vLLM requires on CPU).
"""

from __future__ import annotations

from typing import Any

IN_PROCESS = "uni"
"""vLLM's executor that runs the model in its EngineCore process."""
RAY_EXECUTOR = "ray"
EXECUTOR_KEY = "arks_executor"
"""The LLMConfig ``experimental_configs`` key that records the choice for the engine replica."""


def engine_workers(engine_kwargs: dict[str, Any], tp_key: str = "tensor_parallel_size",
                   pp_key: str = "pipeline_parallel_size") -> int:
    """Workers of one engine: TP x PP, read under the engine's own keys (vLLM's by default)."""
    return int(engine_kwargs.get(tp_key, 1)) * int(engine_kwargs.get(pp_key, 1))


def choose_executor(llm_config: dict[str, Any]) -> dict[str, Any]:
    """``llm_config`` (Ray's LLMConfig, as a dict) with its executor recorded under ``EXECUTOR_KEY``.

    ``uni`` for an engine whose placement is one bundle with one GPU and TP x PP = 1, unless
    ``distributed_executor_backend`` is ``ray``; ``ray`` (Ray's own choice) for the rest. The
    ``distributed_executor_backend`` key is dropped unless it is ``ray``, which Ray's LLMConfig takes.
    Raises ValueError for an executor that cannot run the engine."""
    engine_kwargs = dict(llm_config.get("engine_kwargs") or {})
    asked = engine_kwargs.pop("distributed_executor_backend", None)
    workers = engine_workers(engine_kwargs)
    if asked not in (None, IN_PROCESS, RAY_EXECUTOR):
        raise ValueError(f"--distributed-executor-backend {asked!r} is not supported: use {IN_PROCESS!r} "
                         f"(one GPU, the default there) or {RAY_EXECUTOR!r}")
    if asked == IN_PROCESS and workers > 1:
        raise ValueError(f"--distributed-executor-backend {IN_PROCESS} runs one worker, but TP x PP = {workers}; "
                         f"drop it (Ray's executor is the default there)")
    bundles = (llm_config.get("placement_group_config") or {}).get("bundles") or []
    one_gpu = len(bundles) == 1 and float(bundles[0].get("GPU", 0)) == 1
    executor = IN_PROCESS if workers == 1 and one_gpu and asked != RAY_EXECUTOR else RAY_EXECUTOR
    if asked == RAY_EXECUTOR:
        engine_kwargs["distributed_executor_backend"] = RAY_EXECUTOR
    experimental = {**(llm_config.get("experimental_configs") or {}), EXECUTOR_KEY: executor}
    return {**llm_config, "engine_kwargs": engine_kwargs, "experimental_configs": experimental}
