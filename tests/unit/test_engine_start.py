"""How an engine replica starts vLLM's EngineCore (``deployments.engine_start``): the choice, the fork server
(a real one, in a fresh interpreter) and the hook in vLLM that it replaces for the engine's start."""

from __future__ import annotations

import inspect
import json
import os
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


DEATH = """
import multiprocessing, os, signal, sys, time
sys.path.insert(0, {root!r})
from deployments import engine_start

def sleep_long(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    os.environ["ARKS_ENGINE_CORE_START"] = "forkserver"
    assert engine_start.prestart(preload=())
    proc = engine_start.EngineContext(engine_start._server).Process(target=sleep_long, args=(sys.argv[1],))
    proc.start()
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)  # the replica dies without a word: no finalizer, no shutdown
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_engine_process_stops_when_the_replica_is_killed(tmp_path: Path) -> None:
    import time

    script, pid_file = tmp_path / "death.py", tmp_path / "child.pid"
    script.write_text(DEATH.format(root=str(ROOT)))
    done = subprocess.run([sys.executable, str(script), str(pid_file)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == -9, done.stderr[-3000:]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the forked process outlived the replica"


FALLBACK = """
import json, multiprocessing, multiprocessing.spawn, os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tmp!r})
from deployments import engine_start

def report(queue):
    queue.put({{"parent": os.getppid(), "probe": os.environ.get("ARKS_PROBE")}})

def start(context):
    queue = context.Queue()
    proc = context.Process(target=report, args=(queue,))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(60)
    return {{**got, "exitcode": proc.exitcode, "me": os.getpid()}}

if __name__ == "__main__":
    os.environ.update(ARKS_ENGINE_CORE_START="forkserver", ARKS_PROBE="here")
    assert engine_start.prestart(preload=(sys.argv[1],))
    context = engine_start.EngineContext(engine_start._server)
    out = {{}}
    if sys.argv[2] == "wrapped":  # vLLM's numa_bind sets another executable around the start
        plain = multiprocessing.spawn.get_executable()
        multiprocessing.spawn.set_executable(os.path.join({tmp!r}, "python-wrapper"))
        try:
            out = start(context)
        finally:
            multiprocessing.spawn.set_executable(plain)
    else:
        out = start(context)
    print(json.dumps(out))
"""


@pytest.mark.parametrize(("preload", "mode"), [("boom", "plain"), ("json", "wrapped")],
                         ids=["server-died-on-its-preload", "executable-wrapped"])
def test_what_cannot_use_the_server_is_spawned_instead(tmp_path: Path, preload: str, mode: str) -> None:
    (tmp_path / "boom.py").write_text("raise RuntimeError('not an ImportError: the fork server dies')\n")
    (tmp_path / "python-wrapper").symlink_to(sys.executable)
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK.format(root=str(ROOT), tmp=str(tmp_path)))
    # The fork server finds modules on its own path (Python 3.11 does not give it the parent's sys.path).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), preload, mode], capture_output=True, text=True, timeout=120,
                          check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["parent"] == got["me"]  # spawned by the replica itself
    assert got["probe"] == "here"
    assert got["exitcode"] == 0
    assert "is spawned, not forked from the fork server" in done.stderr


def test_a_server_that_cannot_start_leaves_vllms_spawn(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import multiprocessing.forkserver

    def refuse() -> None:
        raise OSError("AF_UNIX path too long")

    monkeypatch.setattr(engine_start, "_server", None)
    monkeypatch.setenv(engine_start.START_ENV, "forkserver")
    monkeypatch.setattr(multiprocessing.forkserver, "ensure_running", refuse)
    assert engine_start.prestart() is False
    assert engine_start._server is None
    assert "No fork server for vLLM's EngineCore (AF_UNIX path too long)" in caplog.text


def test_the_preload_imports_nothing_that_reads_the_engines_environment_at_import() -> None:
    """Modules decorated with ``eager_break_during_capture`` read ``VLLM_USE_BREAKABLE_CUDAGRAPH`` as they load,
    which vLLM sets in the replica for some models after the server started: they must load after the fork."""
    pytest.importorskip("vllm")
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {engine_start.PRELOAD!r}]\n"
            "from pathlib import Path\n"
            "bad = [n for n, m in list(sys.modules.items()) if n.startswith('vllm') and getattr(m, '__file__', None)"
            " and '@eager_break_during_capture' in Path(m.__file__).read_text(errors='replace')]\n"
            "print(len(sys.modules), bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    count, bad = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) > 300  # vLLM's engine core was imported
    assert bad == "[]"
