"""Counter stores: where rate-limit windows, leases and quota usage live.

They implement the gateway policy's ports (``arks_ray.gateway.ports``: ``CounterStore``, ``ReportBoard``):
``MemoryStore`` (embedded default, one ingress replica) and ``RedisStore`` (Lua scripts, shared by every
replica), with the same contract, tested by one suite.
"""
