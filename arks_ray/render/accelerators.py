"""Accelerator types: which Ray ``accelerator_type`` an app's engine pods have, and whether Ray knows it.

Called by ``arks_ray.render.rayservice`` for each ArksApplication. The type comes from
``spec.accelerator``, or else from a well-known GPU node-selector label of ``instanceSpec.nodeSelector``
(so a pod pinned to H100 nodes is an H100 worker group without saying it twice). It becomes the
LLMConfig's ``accelerator_type`` (Ray adds ``accelerator_type:<T>`` to every bundle) and the worker
group's advertised resource of the same name, so the Ray autoscaler knows which group satisfies it.
"""

from __future__ import annotations

from collections.abc import Mapping

# Ray 2.60's accelerator types (``ray.llm``'s ``AcceleratorType``, from ``ray.util.accelerators``);
# LLMConfig refuses any other value. Kept here because the renderer imports no Ray; a unit test compares
# the two lists, so a Ray upgrade that changes them fails loudly.
RAY_ACCELERATOR_TYPES: tuple[str, ...] = (
    "V100", "P100", "T4", "P4", "K80", "A10G", "L4", "L40S", "A100", "H100", "H200", "H20", "B200", "B300",
    "GB200", "GB300", "RTX-PRO-6000", "Intel-GPU-Max-1550", "Intel-GPU-Max-1100", "Intel-GAUDI",
    "AMD-Instinct-MI100", "AMD-Instinct-MI250X", "AMD-Instinct-MI250X-MI250", "AMD-Instinct-MI210",
    "AMD-Instinct-MI300A", "AMD-Instinct-MI300X-OAM", "AMD-Instinct-MI300X-HF", "AMD-Instinct-MI308X",
    "AMD-Instinct-MI325X-OAM", "AMD-Instinct-MI350X-OAM", "AMD-Instinct-MI355X-OAM",
    "AMD-Radeon-R9-200-HD-7900", "AMD-Radeon-HD-7900", "aws-neuron-core", "TPU-V2", "TPU-V3", "TPU-V4",
    "TPU-V5P", "TPU-V5LITEPOD", "TPU-V6E", "TPU-V7X", "Ascend910B", "Ascend910B4", "MXC500", "MXC550",
    "FURIOSA_RNGD", "M1", "M1-Pro", "M1-Max", "M1-Ultra", "M2", "M2-Pro", "M2-Max", "M2-Ultra", "M3",
    "M3-Pro", "M3-Max", "Apple-Silicon", "A100-40G", "A100-80G", "MOBILINT_ARIES", "MOBILINT_REGULUS",
)

# Node labels that name the GPU model, with the vendor words their values start with:
# NVIDIA GPU feature discovery (``NVIDIA-H100-80GB-HBM3``, ``Tesla-T4``), GKE (``nvidia-tesla-a100``,
# ``nvidia-h100-80gb``) and Karpenter on AWS (``a10g``).
GPU_LABELS: tuple[str, ...] = (
    "nvidia.com/gpu.product",
    "cloud.google.com/gke-accelerator",
    "karpenter.k8s.aws/instance-gpu-name",
)
_VENDOR_WORDS = ("NVIDIA", "TESLA")
_BY_UPPER = {t.upper(): t for t in RAY_ACCELERATOR_TYPES}


def from_node_selector(selector: Mapping[str, str] | None) -> str | None:
    """The Ray accelerator type a GPU node-selector label names, if any (the model word, e.g. H100)."""
    for label in GPU_LABELS:
        value = (selector or {}).get(label)
        if not value:
            continue
        words = [w for w in value.upper().replace("_", "-").split("-") if w]
        while words and words[0] in _VENDOR_WORDS:
            words.pop(0)
        if words and words[0] in _BY_UPPER:
            return _BY_UPPER[words[0]]
    return None


def resolve(accelerator: str | None, selector: Mapping[str, str] | None, gpus: int) -> str | None:
    """``spec.accelerator`` when set (Ray's A10 alias becomes A10G, as LLMConfig does); else, for GPU pods,
    the type their node selector names."""
    if accelerator:
        return "A10G" if accelerator == "A10" else accelerator
    return from_node_selector(selector) if gpus else None


def problem(accelerator: str, gpus: int) -> str | None:
    """Why this accelerator cannot be rendered for pods with ``gpus`` GPUs, or None."""
    if accelerator not in RAY_ACCELERATOR_TYPES:
        return f"{accelerator!r} is not a Ray accelerator type; use one of {', '.join(RAY_ACCELERATOR_TYPES)}"
    if not gpus:
        return (f"accelerator {accelerator} needs GPUs: instanceSpec.resources asks for no nvidia.com/gpu "
                "(Ray refuses an accelerator_type on CPU-only bundles)")
    return None
