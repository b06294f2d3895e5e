"""How an engine replica starts vLLM's EngineCore process: forked from a server that imported vLLM alongside
the replica, rather than spawned after it.

``vllm serve`` forks its EngineCore from the API server, which has imported vLLM already. In a Ray actor vLLM
spawns it instead (forking a Ray worker, with its threads, is not safe), and the new interpreter imports vLLM
again before the engine starts: several seconds of every engine replica's start that raw vLLM does not have.

Here a replica that holds a GPU starts a ``multiprocessing`` fork server as its class loads (``prestart``). The
server imports vLLM's engine core while the replica imports Ray's LLM server, in parallel, and vLLM's
EngineCore is forked from it (``engine_processes``): from a process that has imported what a spawned one would,
and has never touched Ray or CUDA. The child takes its parent's environment as it is when vLLM starts it, as a
spawned one does. The server stays for the engine's life: the child's exit status reaches vLLM through it.

``ARKS_ENGINE_CORE_START`` (the replica's environment) chooses: ``auto`` (the default) forks on a replica with a
GPU, unless ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` says otherwise; ``forkserver`` always (a CPU engine too);
``spawn`` is vLLM's own way. ``vllmServer`` frontends run ``vllm serve`` itself, which forks on its own.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("ray.serve.arks.engines")

START_ENV = "ARKS_ENGINE_CORE_START"
AUTO, FORKSERVER, SPAWN = "auto", "forkserver", "spawn"
CHOICES = (AUTO, FORKSERVER, SPAWN)
PRELOAD = ("vllm.v1.engine.core",)
"""What the server imports before it forks: the EngineCore's own module, which a spawned EngineCore imports
first. The executor and worker modules are imported after the fork, as under ``vllm serve``."""

_server: multiprocessing.context.ForkServerContext | None = None


def choice(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """``ARKS_ENGINE_CORE_START``, checked."""
    value = environ.get(START_ENV, "").strip().lower() or AUTO
    if value not in CHOICES:
        raise ValueError(f"{START_ENV}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def _holds_gpu() -> bool:
    import ray

    return ray.is_initialized() and bool(ray.get_gpu_ids())


def wanted(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether this replica's EngineCore is to be forked from the server."""
    how = choice(environ)
    if how == AUTO:
        return environ.get("VLLM_WORKER_MULTIPROC_METHOD") != "spawn" and _holds_gpu()
    return how == FORKSERVER


def prestart(preload: tuple[str, ...] = PRELOAD) -> bool:
    """Start the fork server now, if it is ``wanted``; whether one runs. It imports ``preload`` in the background:
    call this before the replica's own vLLM imports, so that the two overlap."""
    global _server
    if _server is None and wanted():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
        multiprocessing.forkserver.ensure_running()  # returns at once; forks wait for the imports
        _server = context
    return _server is not None


class EngineProcess(multiprocessing.context.ForkServerProcess):
    """A process forked from the fork server, with its parent's environment at ``start`` (the server's is the
    parent's when the server started): vLLM sets variables for its EngineCore just before starting it."""

    _parent_environ: dict[str, str]

    def start(self) -> None:
        self._parent_environ = dict(os.environ)
        super().start()

    def run(self) -> None:
        os.environ.clear()
        os.environ.update(self._parent_environ)
        super().run()


class EngineContext:
    """vLLM's multiprocessing context while its EngineCore starts: the fork server's, with ``EngineProcess``."""

    Process = EngineProcess

    def __init__(self, base: multiprocessing.context.ForkServerContext) -> None:
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


@contextlib.contextmanager
def engine_processes() -> Iterator[bool]:
    """Around the start of vLLM's engine client: its EngineCore comes from the fork server, if one was
    prestarted (yields whether). vLLM's own choice still runs first, for what it sets in the environment."""
    if _server is None:
        yield False
        return
    engine_utils: Any = importlib.import_module("vllm.v1.engine.utils")  # where vLLM starts its EngineCore
    vllm_context = engine_utils.get_mp_context
    server = _server

    def get_mp_context() -> Any:
        vllm_context()
        return EngineContext(server)

    engine_utils.get_mp_context = get_mp_context
    logger.info("vLLM's EngineCore is forked from a server that imported vLLM as this replica started "
                "(%s=spawn: spawned, vLLM's way)", START_ENV)
    try:
        yield True
    finally:
        engine_utils.get_mp_context = vllm_context
