"""arks-ray's vLLM general plugin: what every vLLM process of an arks-ray engine needs before it computes.

vLLM loads the functions of the ``vllm.general_plugins`` entry-point group in each of its processes (the
engine core and every worker), before the model runs; ``pyproject.toml`` registers ``prepare`` there, so
it runs wherever arks-ray is installed next to vLLM (the engine image, the local venv).

What it does:

- **AMX state on x86 CPUs.** vLLM's CPU attention kernel (``cpu_attention_with_kv_cache``, its ``amx`` ISA,
  chosen for bf16 on CPUs with AMX) runs AMX tile instructions without first asking Linux for the AMX tile
  state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``). A process only holds it if oneDNN happened to ask
  first, so on an AMX CPU the worker dies of SIGILL ("Illegal instruction") in its first forward pass in
  some runs. Measured with vLLM CPU 0.32 on this project's 2-core test machine (a Xeon with AMX): 6 crashes
  in 10 fresh starts of the tiny bf16 embedding model without it, none in 12 with it; the same SIGILL killed
  chat engines of the end-to-end suite now and then. Asking once per process (PyTorch's
  ``torch.cpu._init_amx``) is harmless where there is no AMX (it answers False) and on GPU engines (the CPU
  kernels are not used).

Never raises: a plugin error would stop the engine from starting.
"""

from __future__ import annotations

import logging
import platform

logger = logging.getLogger("arks_ray.engines.vllm_plugin")


def request_amx_state() -> bool:
    """Ask Linux for the AMX tile state for this process, where the CPU has AMX; True if it is held."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())
    except Exception as exc:  # an older or CPU-less torch build: nothing to ask for
        logger.debug("AMX state not requested: %s", exc)
        return False


def prepare() -> None:
    """The entry point vLLM calls in each of its processes."""
    request_amx_state()


__all__ = ["prepare", "request_amx_state"]
