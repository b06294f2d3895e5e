"""The arks-ray operator (kopf): Arks resources in, a KubeRay RayService, model PVCs/Jobs and statuses out.

Run it with ``python -m controller``. Layers, from the outside in:

- ``__main__``, ``runtime``: flags and environment -> settings -> clients -> ``kopf.operator``.
- ``handlers``: kopf glue; every event of a watched kind schedules its namespace.
- ``scheduling``: one coalesced, retried reconcile per namespace, plus drift and status ticks.
- ``reconcile``: reads a namespace, asks the planners, writes only what differs (I/O).
- ``plans``, ``downloads``, ``status``, ``snapshot``, ``meta``: pure decisions, no I/O, no clock.
- ``kube`` (the ``KubeClient`` port on the official client), ``memkube`` (in memory, for tests),
  ``errors``, ``settings``, ``metrics``, ``writes``.

The render itself is ``arks_ray.render`` (pure); this package never imports ``deployments``.
"""
