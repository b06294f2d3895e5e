"""Pure rendering of Arks objects into KubeRay RayService, PVC and Job manifests.

``render`` / ``render_namespace`` are the entry points; the CLI, the local runner and the controller
call them. Nothing in this package does I/O or imports a client.
"""

from arks_ray.render.options import RenderOptions
from arks_ray.render.rayservice import SPEC_HASH_ANNOTATION, Rendered, render, render_namespace

__all__ = ["SPEC_HASH_ANNOTATION", "RenderOptions", "Rendered", "render", "render_namespace"]
