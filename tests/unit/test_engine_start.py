"""How an engine replica starts vLLM's EngineCore (``deployments.engine_start``): the choice, the fork server
(a real one, in a fresh interpreter) and the hook in vLLM that it replaces for the engine's start."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from deployments import engine_start
from tests.support.paths import ROOT


@pytest.mark.parametrize(("value", "expected"), [(None, "auto"), ("", "auto"), ("FORKSERVER", "forkserver"),
                                                 (" spawn ", "spawn"), ("auto", "auto")])
def test_the_choice_defaults_to_auto(value: str | None, expected: str) -> None:
    assert engine_start.choice({} if value is None else {engine_start.START_ENV: value}) == expected


def test_a_choice_it_does_not_know_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="ARKS_ENGINE_CORE_START='fork' is not one of auto, forkserver, spawn"):
        engine_start.choice({engine_start.START_ENV: "fork"})


@pytest.mark.parametrize(("environ", "gpu", "expected"), [
    ({}, True, True),
    ({}, False, False),  # a CPU engine: vLLM's CPU platform spawns its EngineCore outside Ray too
    ({"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}, True, False),
    ({"VLLM_WORKER_MULTIPROC_METHOD": "fork"}, True, True),
    ({engine_start.START_ENV: "forkserver"}, False, True),
    ({engine_start.START_ENV: "spawn"}, True, False),
])
def test_auto_forks_only_on_a_replica_with_a_gpu(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str],
                                                  gpu: bool, expected: bool) -> None:
    monkeypatch.setattr(engine_start, "_holds_gpu", lambda: gpu)
    assert engine_start.wanted(environ) is expected


def test_outside_a_ray_worker_there_is_no_gpu_to_hold() -> None:
    assert engine_start._holds_gpu() is False


SCRIPT = """
import json, multiprocessing, os, sys
sys.path.insert(0, {root!r})
from deployments import engine_start

def report(queue):
    queue.put({{"probe": os.environ.get("ARKS_PROBE"), "gone": "ARKS_GONE" in os.environ,
               "preloaded": "wave" in sys.modules, "parent": os.getppid()}})

if __name__ == "__main__":
    os.environ.update(ARKS_ENGINE_CORE_START="forkserver", ARKS_GONE="1")
    print(json.dumps({{"started": engine_start.prestart(preload=("wave",)), "again": engine_start.prestart()}}))
    os.environ["ARKS_PROBE"] = "set after the server started"
    del os.environ["ARKS_GONE"]
    context = engine_start.EngineContext(engine_start._server)
    queue = context.Queue()
    proc = context.Process(target=report, args=(queue,))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(60)
    got.update(me=os.getpid(), exitcode=proc.exitcode, wave_here="wave" in sys.modules)
    print(json.dumps(got))
"""


def test_the_engine_process_is_forked_from_the_preloaded_server_with_its_parents_environment_at_start(
        tmp_path: Path) -> None:
    script = tmp_path / "fork_server_probe.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    started, got = (json.loads(line) for line in done.stdout.splitlines()[-2:])
    assert started == {"started": True, "again": True}
    assert got["probe"] == "set after the server started"  # the parent's environment at start, not the server's
    assert got["gone"] is False
    assert got["preloaded"] is True  # imported by the server, before the fork
    assert got["wave_here"] is False
    assert got["parent"] != got["me"]  # a child of the fork server, not of the replica
    assert got["exitcode"] == 0


def test_without_a_server_vllms_own_start_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_start, "_server", None)
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.utils", None)  # would fail if imported
    with engine_start.engine_processes() as forked:
        assert forked is False


def test_with_a_server_vllms_engine_core_comes_from_it_while_the_engine_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine_utils = pytest.importorskip("vllm.v1.engine.utils")
    calls: list[int] = []
    monkeypatch.setattr(engine_utils, "get_mp_context", lambda: calls.append(1))
    original = engine_utils.get_mp_context
    server: Any = object()
    monkeypatch.setattr(engine_start, "_server", server)
    with engine_start.engine_processes() as forked:
        context = engine_utils.get_mp_context()
        assert forked is True
        assert isinstance(context, engine_start.EngineContext)
        assert context.Process is engine_start.EngineProcess
        assert calls == [1]  # vLLM's own choice ran, for what it sets in the environment
    assert engine_utils.get_mp_context is original


def test_vllm_starts_its_engine_core_through_the_hook_replaced() -> None:
    """``engine_processes`` replaces ``get_mp_context`` in the module that starts the EngineCore: a vLLM that
    takes its context elsewhere fails here rather than quietly spawning again."""
    engine_utils = pytest.importorskip("vllm.v1.engine.utils")
    source = textwrap.dedent(inspect.getsource(engine_utils.CoreEngineProcManager.__init__))
    assert "context = get_mp_context()" in source
    assert "context.Process(" in source
    assert "proc.start()" in source
