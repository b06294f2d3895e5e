"""PD-disaggregated applications: ``deployments.disaggregated:build_app`` is the import path of every
rendered ArksDisaggregatedApplication.

Serve calls ``build_app(args)`` with the ``args`` from ``arks_ray.render.serve_config.disaggregated_app``;
``runtime`` picks the builder: vLLM prefill/decode through ``ray.serve.llm``, or Dynamo prefill/decode
workers behind a Dynamo frontend.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application


def build_app(raw: dict[str, Any]) -> Application:
    """Serve's entry point for a disaggregated application."""
    name, runtime = raw.get("name", "?"), raw.get("runtime", "vllm")
    if runtime == "vllm":
        from deployments.pd_vllm import build_pd_vllm

        return build_pd_vllm(raw)
    if runtime == "dynamo":
        from deployments.dynamo_apps import build_dynamo_pd

        return build_dynamo_pd(raw)
    raise ValueError(f"application {name}: disaggregated serving with runtime {runtime!r} is not available in "
                     "this build")
