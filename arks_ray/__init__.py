"""arks-ray: the Arks API (arks.ai/v1) for LLM inference, built on Ray Serve and KubeRay.

The package is the pure core (API models, rendering, gateway policy) plus its adapters; the Ray Serve
deployments live in the top-level ``deployments`` package and the operator in ``controller``.
"""

__version__ = "0.1.0"
