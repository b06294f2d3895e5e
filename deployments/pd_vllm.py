"""vLLM prefill/decode (PD) applications: Ray's PD servers, as ``build_pd_openai_app`` wires them, behind
the gateway protocol.

Called by ``deployments.disaggregated.build_app`` for ``runtime: vllm``, with the args of
``arks_ray.render.serve_config.disaggregated_app``. The graph is Ray's ``build_pd_openai_app`` without its
OpenAI ingress, because the gateway is the ingress:

    gateway --app handle, generate()--> Decode (PDDecodeServer + generate) --handle--> Prefill (PDPrefillServer)

The decode replica runs its own engine and orchestrates: it sends the prefill (one token, with
``kv_transfer_params``) to a prefill replica, then decodes locally from the transferred KV cache. Both
sides carry a vLLM ``kv_transfer_config`` (NIXL by default, or LMCache and the others Ray knows), which
Ray's ``PDServingArgs`` validates here exactly as ``build_pd_openai_app`` does. KV transfer needs GPUs
and NIXL/LMCache, so on CPU this is built and checked, not run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.serve import Application


class PDAppArgs(BaseModel):
    """The ``args`` of a rendered vLLM ArksDisaggregatedApplication."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The ArksDisaggregatedApplication this app serves.")
    runtime: str = "vllm"
    prefill: dict[str, Any] = Field(description="LLMConfig of the prefill deployment.")
    decode: dict[str, Any] = Field(description="LLMConfig of the decode deployment.")
    router: dict[str, Any] | None = Field(None, description="Arks' router settings; unused for vLLM.")


def _decode_class(base: type) -> type:
    """Ray's decode server with the gateway's ``generate`` (from the vLLM engine server) on top."""
    from deployments.vllm_engine import _llm_server_class

    # MRO: ArksPDDecodeServer -> PD(DP)DecodeServer -> PDOrchestratorMixin -> ... -> ArksLLMServer -> LLMServer:
    # chat/completions orchestrate the prefill, and their local decode goes through ArksLLMServer's batching.
    return type("ArksPDDecodeServer", (base, _llm_server_class()),
                {"__doc__": "Ray's PD decode server speaking the gateway protocol.", "__module__": __name__})


def build_pd_vllm(raw: dict[str, Any]) -> Application:
    """Prefill and decode deployments of one vLLM PD app; the decode one is the app's ingress."""
    from ray.llm._internal.serve.serving_patterns.data_parallel.builder import build_dp_deployment
    from ray.llm._internal.serve.serving_patterns.prefill_decode.builder import PDServingArgs
    from ray.llm._internal.serve.serving_patterns.prefill_decode.pd_server import (
        DPPDDecodeServer,
        DPPDPrefillServer,
        PDDecodeServer,
        PDPrefillServer,
    )
    from ray.serve.llm import build_llm_deployment

    name = raw.get("name", "?")
    try:
        args = PDAppArgs.model_validate(raw)
        pd: Any = PDServingArgs.model_validate({"prefill_config": args.prefill, "decode_config": args.decode})
    except (ValidationError, ValueError) as exc:
        raise ValueError(f"application {name}: invalid PD config: {exc}") from None
    # Data-parallel sides use Ray's DP servers (gang-scheduled replicas), as build_pd_openai_app does.
    prefill_dp = pd.prefill_config.engine_kwargs.get("data_parallel_size", 1) > 1
    decode_dp = pd.decode_config.engine_kwargs.get("data_parallel_size", 1) > 1
    prefill = (build_dp_deployment if prefill_dp else build_llm_deployment)(
        pd.prefill_config, name_prefix="Prefill:",
        deployment_cls=DPPDPrefillServer if prefill_dp else PDPrefillServer)  # type: ignore[arg-type]
    decode_cls = _decode_class(DPPDDecodeServer if decode_dp else PDDecodeServer)
    return (build_dp_deployment if decode_dp else build_llm_deployment)(
        pd.decode_config, name_prefix="Decode:", bind_kwargs={"prefill_server": prefill}, deployment_cls=decode_cls)
