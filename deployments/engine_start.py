"""How an engine replica starts vLLM's EngineCore process: forked from a server that imported vLLM alongside
the replica, rather than spawned after it.

``vllm serve`` forks its EngineCore from the API server, which has imported vLLM already. In a Ray actor vLLM
spawns it instead (forking a Ray worker, with its threads, is not safe), and the new interpreter imports vLLM
again before the engine starts: several seconds of every engine replica's start that raw vLLM does not have.

Here a replica that holds a GPU starts a ``multiprocessing`` fork server as its class loads (``prestart``). The
server imports vLLM's engine core while the replica imports Ray's LLM server, in parallel, and vLLM's
EngineCore is forked from it (``engine_processes``): from a process that has imported what a spawned one would,
and has never connected to Ray or initialised CUDA. The child takes its parent's environment as it is when vLLM
starts it, for everything read after the fork (what the preloaded modules read as they were imported, they read
from the replica's environment at class load: nothing vLLM sets before the engine starts, see ``PRELOAD``).
The server stays for the engine's life (about 600 MB, most of it shared with the EngineCore): the child's exit
status reaches vLLM through it. The child also watches the replica itself, and stops (SIGTERM, which vLLM's
EngineCore handles) when the replica is gone, even if the server went first.

What cannot use the server falls back to vLLM's spawn, with a warning: a server that fails to start or to fork,
or a start vLLM wraps in another executable (``numa_bind``'s numactl).

``ARKS_ENGINE_CORE_START`` (the replica's environment) chooses: ``auto`` (the default) forks on a replica with a
GPU, unless ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` says otherwise; ``forkserver`` always (a CPU engine too);
``spawn`` is vLLM's own way. ``vllmServer`` frontends run ``vllm serve`` itself, which forks on its own. The PD
servers (``deployments.pd_vllm``) do not start a server, and spawn.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.spawn
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("ray.serve.arks.engines")

START_ENV = "ARKS_ENGINE_CORE_START"
AUTO, FORKSERVER, SPAWN = "auto", "forkserver", "spawn"
CHOICES = (AUTO, FORKSERVER, SPAWN)
PRELOAD = ("vllm.v1.engine.core",)
"""What the server imports before it forks: the EngineCore's own module, which a spawned EngineCore imports
first. The executor, worker, model and attention modules are imported after the fork, as under ``vllm serve``:
some read at import what vLLM sets in the replica's environment for the engine (``VLLM_USE_BREAKABLE_CUDAGRAPH``
for some models), so they must not be preloaded (``tests/unit/test_engine_start.py`` checks)."""

_server: multiprocessing.context.ForkServerContext | None = None
_plain_executable: str | None = None  # the interpreter children are started with, unless vLLM wraps it


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
    global _server, _plain_executable
    if _server is None and wanted():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
        try:
            multiprocessing.forkserver.ensure_running()  # returns at once; forks wait for the imports
        except Exception as exc:  # e.g. a temp dir whose socket path is too long: vLLM's spawn, as before
            logger.warning("No fork server for vLLM's EngineCore (%s): it will be spawned", exc)
            return False
        _server, _plain_executable = context, os.fsdecode(multiprocessing.spawn.get_executable())
    return _server is not None


def _spawn_popen(process_obj: Any) -> Any:
    return multiprocessing.context.SpawnProcess._Popen(process_obj)


def _exit_with_parent() -> None:
    """Stop this process (SIGTERM) once the process that started it is gone: the fork server, its parent in
    the process tree, may outlive the replica or die before it, and Ray's clean-up of the replica's process
    group is a setting (``RAY_process_group_cleanup_enabled``)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="arks-exit-with-parent", daemon=True).start()


class EngineProcess(multiprocessing.context.ForkServerProcess):
    """A process forked from the fork server, with its parent's environment at ``start`` (the server's is the
    parent's when the server started): vLLM sets variables for its EngineCore just before starting it."""

    _parent_environ: dict[str, str]

    def start(self) -> None:
        self._parent_environ = dict(os.environ)
        if os.fsdecode(multiprocessing.spawn.get_executable()) != _plain_executable:
            self._spawn("vLLM starts it through another executable (numa_bind)")
            return
        try:
            super().start()
        except (OSError, EOFError) as exc:  # the server died on its preload, or cannot be reached
            self._spawn(f"the fork server failed: {exc!r}")

    def _spawn(self, why: str) -> None:
        logger.warning("vLLM's EngineCore is spawned, not forked from the fork server: %s", why)
        self._Popen = _spawn_popen  # type: ignore[method-assign]
        super().start()

    def run(self) -> None:
        os.environ.clear()
        os.environ.update(self._parent_environ)
        _exit_with_parent()
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
