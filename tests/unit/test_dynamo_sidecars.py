"""Sidecar supervision: the restart policy (``arks_ray.engines.sidecars``) and the process runner
(``deployments.dynamo_sidecars``), with real short-lived processes and an injected sleep and clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from arks_ray.engines.dynamo import LaunchSpec
from arks_ray.engines.sidecars import RestartPolicy, SidecarTracker
from deployments.dynamo_sidecars import Sidecar

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

POLICY = RestartPolicy(initial_backoff_s=1, max_backoff_s=8, factor=2, max_restarts=4, window_s=100,
                       stable_after_s=30)


def crash(tracker: SidecarTracker, at: float, lived: float = 1, code: int = 1) -> float | None:
    tracker.started(at - lived)
    return tracker.exited(at, code).delay_s


def test_backoff_doubles_for_quick_crashes_up_to_the_cap() -> None:
    t = SidecarTracker("worker", RestartPolicy(initial_backoff_s=1, max_backoff_s=4, max_restarts=10))
    delays = [crash(t, 10.0 * i) for i in range(1, 6)]
    assert delays == [1, 2, 4, 4, 4]
    assert t.restarts == 5
    assert t.state == "backoff"
    assert t.last_exit == 1


def test_a_start_that_lived_long_resets_the_backoff() -> None:
    t = SidecarTracker("worker", RestartPolicy(initial_backoff_s=1, max_backoff_s=8, max_restarts=10,
                                               stable_after_s=30))
    assert [crash(t, 10), crash(t, 20), crash(t, 30)] == [1, 2, 4]
    assert crash(t, 90, lived=40) == 1
    assert crash(t, 95) == 2


def test_too_many_exits_within_the_window_give_up_and_report() -> None:
    t = SidecarTracker("frontend", POLICY)
    for i in range(4):
        assert crash(t, 10.0 + i, code=3) is not None
    t.started(19)
    decision = t.exited(20, 3)
    assert decision.delay_s is None
    assert t.state == "failed"
    assert "frontend exited with code 3; 5 exits within 100s, giving up" in decision.reason
    # Failed is final: a later exit changes nothing.
    assert t.exited(30, 0).delay_s is None
    assert t.state == "failed"


def test_old_exits_fall_out_of_the_window() -> None:
    t = SidecarTracker("worker", POLICY)
    for at in (10, 11, 12, 13):
        crash(t, at)
    assert crash(t, 200, lived=1) is not None  # the four early exits are forgotten
    assert t.state == "backoff"


def test_a_process_that_could_not_start_counts_as_an_exit() -> None:
    t = SidecarTracker("worker", POLICY)
    decision = t.exited(5, None)
    assert decision.delay_s == 1
    assert "worker could not start" in decision.reason


def test_stopping_is_not_a_failure_and_stops_restarts() -> None:
    t = SidecarTracker("worker", POLICY)
    t.started(0)
    t.stopped()
    assert t.exited(1, -15).delay_s is None
    assert t.state == "stopped"


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="backoff"):
        RestartPolicy(initial_backoff_s=5, max_backoff_s=1)
    with pytest.raises(ValueError, match="limits"):
        RestartPolicy(max_restarts=-1)


class Recorder:
    """An injected sleep: records the delays and yields to the loop instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def spec(code: str, role: str = "worker") -> LaunchSpec:
    return LaunchSpec(role, (sys.executable, "-c", code), {"ARKS_TEST_VAR": "from-spec"})


async def test_a_crashing_process_is_restarted_with_backoff_until_it_fails(tmp_path: Path) -> None:
    sleep = Recorder()
    clock = iter(range(0, 1000, 1))
    sidecar = Sidecar(spec("import sys; sys.exit(3)"), tmp_path, policy=POLICY, sleep=sleep,
                      clock=lambda: float(next(clock)))
    sidecar.start()
    await asyncio.wait_for(sidecar.done.wait(), 60)
    assert sidecar.failed
    assert sleep.delays == [1, 2, 4, 8]
    status = sidecar.status()
    assert (status["state"], status["starts"], status["restarts"], status["last_exit"]) == ("failed", 5, 4, 3)
    assert sidecar.log_path.read_text().count("=== arks-ray: start") == 5
    await sidecar.stop()


async def test_a_killed_process_comes_back_with_a_new_pid(tmp_path: Path) -> None:
    sidecar = Sidecar(spec("import time; time.sleep(60)"), tmp_path, policy=POLICY, sleep=Recorder())
    sidecar.start()
    try:
        first = await wait_for_pid(sidecar, None)
        await sidecar.kill()
        second = await wait_for_pid(sidecar, first)
        assert second != first
        assert sidecar.tracker.restarts == 1
        assert sidecar.tracker.last_exit == -signal.SIGKILL
    finally:
        await sidecar.stop()
    assert sidecar.tracker.state == "stopped"
    assert sidecar.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)


async def test_sidecars_see_the_spec_env_but_not_the_replicas_python_path(tmp_path: Path) -> None:
    code = "import os; print('VAR', os.environ.get('ARKS_TEST_VAR'), 'PP', os.environ.get('PYTHONPATH'))"
    sidecar = Sidecar(spec(code), tmp_path, policy=RestartPolicy(max_restarts=0), sleep=Recorder(),
                      base_env={"PYTHONPATH": "/replica/site", "PATH": os.environ["PATH"]})
    sidecar.start()
    await asyncio.wait_for(sidecar.done.wait(), 30)
    assert "VAR from-spec PP None" in sidecar.log_tail()
    await sidecar.stop()


async def test_a_missing_interpreter_is_reported_in_the_log(tmp_path: Path) -> None:
    missing = LaunchSpec("worker", ("/nonexistent/python", "-m", "dynamo.mocker"))
    sidecar = Sidecar(missing, tmp_path, policy=RestartPolicy(max_restarts=0), sleep=Recorder())
    sidecar.start()
    await asyncio.wait_for(sidecar.done.wait(), 30)
    assert sidecar.failed
    assert "/nonexistent/python" in sidecar.log_tail()
    await sidecar.stop()


async def wait_for_pid(sidecar: Sidecar, not_this: int | None) -> int:
    for _ in range(2000):
        pid = sidecar.pid
        if pid is not None and pid != not_this:
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError("the sidecar did not start")


PARENT = """
import asyncio, sys
from pathlib import Path
from arks_ray.engines.dynamo import LaunchSpec
from deployments.dynamo_sidecars import Sidecar

# The sidecar starts a child of its own (as vLLM's API server starts its EngineCore) and writes its pid.
CODE = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '120']); "
        "open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(120)")

async def main():
    spec = LaunchSpec("worker", (sys.executable, "-c", CODE, sys.argv[1] + "/grandchild"))
    sidecar = Sidecar(spec, Path(sys.argv[1]))
    sidecar.start()
    while sidecar.pid is None:
        await asyncio.sleep(0.01)
    print(sidecar.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.mark.parametrize("as_ray_does", [False, True])
def test_a_sidecar_dies_with_its_replica_process_even_without_cleanup(tmp_path: Path, as_ray_does: bool) -> None:
    """And so do the sidecar's own children: vLLM's EngineCore outlived a killed API server before. Ray kills a
    dead worker's direct children (the shim) at once, which left the sidecar itself behind before."""
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        pids.append(int(parent.stdout.readline()))
        marker = tmp_path / "grandchild"
        for _ in range(500):
            if marker.exists() and marker.read_text():
                break
            time.sleep(0.02)
        grandchild = int(marker.read_text())
        command = int(Path(f"/proc/{grandchild}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        pids += [command, grandchild]
        for pid in pids:
            os.kill(pid, 0)  # alive
        parent.kill()  # SIGKILL: no destructor, no cleanup code runs
        if as_ray_does:
            os.kill(pids[0], signal.SIGKILL)  # the shim, the replica's direct child
        parent.wait()
        for _ in range(500):
            if not [pid for pid in pids if alive(pid)]:
                return
            time.sleep(0.02)
        raise AssertionError(f"outlived their replica: {[pid for pid in pids if alive(pid)]}")
    finally:
        parent.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped by init) is gone for our purpose
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


async def test_what_an_exiting_sidecar_leaves_behind_is_killed_and_its_code_kept(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild"
    code = ("import subprocess, sys; child = subprocess.Popen(['sleep', '120']); "
            f"open({str(marker)!r}, 'w').write(str(child.pid)); sys.exit(3)")
    sidecar = Sidecar(spec(code), tmp_path, policy=RestartPolicy(max_restarts=0), sleep=Recorder())
    sidecar.start()
    await asyncio.wait_for(sidecar.done.wait(), 30)
    grandchild = int(marker.read_text())
    try:
        assert sidecar.tracker.last_exit == 3
        for _ in range(250):
            if not alive(grandchild):
                break
            await asyncio.sleep(0.02)
        assert not alive(grandchild)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
        await sidecar.stop()


async def test_a_command_killed_under_the_shim_exits_as_killed(tmp_path: Path) -> None:
    """The shim dies of the signal that killed its command, SIGKILL included (it took no handler for it)."""
    marker = tmp_path / "pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    sidecar = Sidecar(spec(code), tmp_path, policy=RestartPolicy(max_restarts=0), sleep=Recorder())
    sidecar.start()
    try:
        for _ in range(500):
            if marker.exists() and marker.read_text():
                break
            await asyncio.sleep(0.01)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the command, not the shim
        await asyncio.wait_for(sidecar.done.wait(), 30)
        assert sidecar.tracker.last_exit == -signal.SIGKILL
        assert "Traceback" not in sidecar.log_tail()
    finally:
        await sidecar.stop()


def test_a_starting_server_is_given_its_startup_time_then_three_misses() -> None:
    from arks_ray.engines.sidecars import Liveness

    live = Liveness(misses=3, startup_s=100)
    # Start 1 loads its model: not answering for 90 s is no reason to kill it.
    assert [live.check(1, t, False) for t in (0, 30, 60, 90)] == [None] * 4
    assert live.check(1, 95, True) is None
    assert live.check(1, 100, False) is None
    assert live.check(1, 110, False) is None
    assert live.check(1, 120, False) == "failed 3 health checks in a row"
    # Start 2 (the restart) starts over: its own startup time, then its own count.
    assert [live.check(2, t, False) for t in (130, 160, 190, 220)] == [None] * 4
    assert live.check(2, 231, False) == "did not answer within 100s of its start"
    assert live.check(3, 240, True) is None
    assert live.check(3, 250, False) is None
    assert live.check(3, 260, True) is None  # an answer resets the count
    assert [live.check(3, t, False) for t in (270, 280)] == [None, None]
