"""SLO-driven autoscaling of engine replicas: what replicas report and how the policy decides. Pure.

- ``replica``: what an engine replica measures (TTFT/TPOT per request, requests in flight, vLLM's queue
  and KV-cache use) and reports to Serve through ``record_autoscaling_stats``. Used by
  ``deployments.vllm_engine``.
- ``decision``: the scaling decision, a pure function of the settings, one observation and the memory
  of earlier observations (panic and stable windows, step limits, bounds, a reason for everything).
  Used by the Serve policy adapter ``deployments.autoscaling``.
- ``history``: the step-function history the windows are computed over.
- ``config``: ``ArksApplication.spec.autoscaling`` as Serve's ``autoscaling_config``. Used by the
  renderer.

Nothing here imports Ray: time is always passed in, so tests drive every window with synthetic series.
"""
