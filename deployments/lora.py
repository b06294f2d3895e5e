"""LoRA adapters on a vLLM engine replica: the adapter table from Serve's ``user_config``, and the loader.

Used by ``deployments.vllm_engine.ArksLLMServer``. The renderer (``arks_ray.render.lora``) puts the table
``{"<base>:<adapter>": path}`` in the engine deployment's ``user_config``; Serve hands it to every replica,
live ones through ``reconfigure`` (no restart) and new ones when they start. The gateway selects an
adapter by Serve's multiplexed model id, and Ray's ``LLMServer`` resolves that id through the loader
installed here (in place of Ray's, which only downloads from cloud storage) and loads it into vLLM.

An adapter taken out of the table is refused on the next request even if the replica still has it
loaded; vLLM's own LRU and Serve's per-replica model cap evict it later.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("ray.serve.arks.engines")


class UnknownAdapter(ValueError):
    """A request for an adapter this application does not serve (a client's mistake: 400)."""


class AdapterTable:
    """The adapters one replica may serve, and how long each took to load here."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}
        self.load_seconds: dict[str, float] = {}

    def update(self, config: dict[str, Any] | None) -> None:
        """Take the ``adapters`` mapping of a ``user_config``; absent means no change."""
        given = (config or {}).get("adapters")
        if given is None:
            return
        table = {str(k): str(v) for k, v in dict(given).items()}
        added, removed = sorted(set(table) - set(self.paths)), sorted(set(self.paths) - set(table))
        self.paths = table
        if added or removed:
            logger.info("LoRA adapters: %d served (added %s; removed %s)", len(table), added or "none",
                        removed or "none")

    def path(self, adapter_id: str) -> str:
        found = self.paths.get(adapter_id)
        if found is None:
            raise UnknownAdapter(f"the adapter {adapter_id!r} is not served by this application")
        return found


def install_loader(server: Any, table: AdapterTable, max_per_replica: int) -> None:
    """Give Ray's ``LLMServer`` a multiplexed loader reading ``table`` (local or mounted paths)."""
    from ray import serve
    from ray.llm._internal.common.models import global_id_manager
    from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

    async def _load_model(lora_model_id: str) -> Any:
        return DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=None,
                                   local_path=table.path(lora_model_id),
                                   lora_assigned_int_id=global_id_manager.next())

    server._load_model = serve.multiplexed(max_num_models_per_replica=max_per_replica)(_load_model)


async def resolve_adapter(server: Any, table: AdapterTable) -> None:
    """Load the request's adapter into vLLM if it is not yet (Ray's ``_maybe_resolve_lora_from_multiplex``),
    refusing one no longer in the table; the first load on this replica is timed and logged."""
    from ray import serve

    adapter_id = serve.get_multiplexed_model_id()
    if not adapter_id:
        return
    table.path(adapter_id)
    loaded = adapter_id in server.engine._oai_models.lora_requests
    started = time.monotonic()
    disk = await server._load_model(adapter_id)
    await server.engine.resolve_lora(disk)
    if not loaded:
        took = time.monotonic() - started
        table.load_seconds[adapter_id] = took
        logger.info("LoRA adapter %s loaded on this replica in %.3fs", adapter_id, took)
