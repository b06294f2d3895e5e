"""The Arks API (arks.ai/v1) as pydantic models, the gateway config schema, and the loader.

Used by the renderer, the CLI, the gateway and the controller. Pure: no I/O.
"""

from arks_ray.api.application import ArksApplication
from arks_ray.api.disaggregated import ArksDisaggregatedApplication
from arks_ray.api.endpoint import ArksEndpoint
from arks_ray.api.loading import ArksObject, Loaded, Secret, load_documents, load_yaml
from arks_ray.api.model import ArksModel
from arks_ray.api.quota import ArksQuota
from arks_ray.api.token import ArksToken

__all__ = [
    "ArksApplication",
    "ArksDisaggregatedApplication",
    "ArksEndpoint",
    "ArksModel",
    "ArksObject",
    "ArksQuota",
    "ArksToken",
    "Loaded",
    "Secret",
    "load_documents",
    "load_yaml",
]
