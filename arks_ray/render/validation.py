"""Render-time checks that only the combination of fields can fail: what would validate, render, and then
fail when Serve deploys it, or run on an image that cannot host it. Pure.

Called by ``arks_ray.render.rayservice`` for every app, so ``arks-ray validate``, ``arks-ray render`` and
the operator's precheck (which turns render problems into the Precheck condition) all say the same
thing, naming the field.
"""

from __future__ import annotations

from arks_ray.api.application import ArksApplication
from arks_ray.api.disaggregated import ArksDisaggregatedApplication
from arks_ray.errors import Problem

PD_RUNTIMES = ("vllm", "dynamo")
"""Runtimes ``deployments.disaggregated`` can build a PD application for."""

RAY_IMAGE_HINT = "ray"
"""An image whose repository name has this in it is taken for a Ray runtime image (rayproject/ray-llm,
arks-ray-*): engines run inside Ray worker pods, so a plain engine image (vllm/vllm-openai,
lmsysorg/sglang) starts no Ray node."""


def disaggregated_errors(app: ArksDisaggregatedApplication) -> list[Problem]:
    """Errors that refuse a PD application before it reaches Serve."""
    runtime = app.spec.runtime
    if runtime in PD_RUNTIMES:
        return []
    return [Problem(app.kind, app.metadata.name, "spec.runtime",
                    f"disaggregated serving with runtime {runtime!r} is not available in arks-ray yet (it is "
                    f"Arks' default when spec.runtime is empty); set spec.runtime to one of "
                    f"{', '.join(PD_RUNTIMES)}")]


def is_ray_image(image: str) -> bool:
    """Whether an image reference names a Ray runtime image (a heuristic on the repository name)."""
    repository = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    return RAY_IMAGE_HINT in repository.lower()


def app_warnings(app: ArksApplication | ArksDisaggregatedApplication) -> list[Problem]:
    """Warnings about an app that deploys, but maybe not as meant."""
    image = app.spec.runtime_image
    if image and not is_ray_image(image):
        return [Problem(app.kind, app.metadata.name, "spec.runtimeImage",
                        f"{image!r} does not look like a Ray runtime image: arks-ray runs engines in Ray worker "
                        "pods, so the image needs Ray 2.60 and arks-ray (build one FROM docker/runtime-gpu"
                        ".Dockerfile, or leave runtimeImage out for the default)", "warning")]
    return []
