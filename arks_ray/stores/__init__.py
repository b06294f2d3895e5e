"""Counter stores: where rate-limit windows, leases and quota usage live.

``CounterStore`` is the port; ``MemoryStore`` (embedded default, one ingress replica) and ``RedisStore``
(Lua scripts, shared by every replica) implement it with the same contract, tested by one suite.
"""

from arks_ray.stores.base import CounterStore, Decision, StoreUnavailable

__all__ = ["CounterStore", "Decision", "StoreUnavailable"]
