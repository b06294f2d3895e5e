"""GPUs for ``arks-ray up``: detection (``CUDA_VISIBLE_DEVICES``, ``nvidia-smi -L``), what a config needs
(from the rendered placement bundles), and the refusal when it needs more than the machine offers."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from arks_ray.api.loading import load_yaml
from arks_ray.cli import app
from arks_ray.local import runner

NVIDIA_SMI_L = """GPU 0: NVIDIA H200 (UUID: GPU-5a1c0e2e-0000-0000-0000-000000000000)
GPU 1: NVIDIA H200 (UUID: GPU-5a1c0e2e-0000-0000-0000-000000000001)
  MIG 1g.18gb     Device  0: (UUID: MIG-1b4c0f00-0000-0000-0000-000000000000)
"""


def smi(stdout: str = NVIDIA_SMI_L, returncode: int = 0) -> Any:
    calls: list[list[str]] = []

    def run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, stdout, "")

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_nvidia_smi_lists_the_gpus() -> None:
    run = smi()
    assert runner.detect_gpus(run, env={}) == 2
    assert run.calls == [["nvidia-smi", "-L"]]


def test_cuda_visible_devices_wins_over_nvidia_smi() -> None:
    run = smi()
    assert runner.detect_gpus(run, env={"CUDA_VISIBLE_DEVICES": "3"}) == 1
    assert runner.detect_gpus(run, env={"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert runner.detect_gpus(run, env={"CUDA_VISIBLE_DEVICES": "-1"}) == 0
    assert run.calls == []


def test_no_driver_no_gpus() -> None:
    def missing(cmd: list[str], **_: Any) -> None:
        raise FileNotFoundError(cmd[0])

    assert runner.detect_gpus(missing, env={}) == 0
    assert runner.detect_gpus(smi("NVIDIA-SMI has failed: no devices were found", 9), env={}) == 0


def app_yaml(model_dir: Path, replicas: int, gpus: int, tp: int = 1) -> str:
    return f"""
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {{name: m, namespace: default}}
spec: {{model: local/m, source: {{local: {{path: {model_dir}}}}}}}
---
apiVersion: arks.ai/v1
kind: ArksApplication
metadata: {{name: big, namespace: default}}
spec:
  replicas: {replicas}
  runtime: vllm
  model: {{name: m}}
  tensorParallelSize: {tp}
  instanceSpec:
    resources: {{limits: {{nvidia.com/gpu: "{gpus}"}}, requests: {{nvidia.com/gpu: "{gpus}"}}}}
"""


def test_gpus_needed_from_the_rendered_bundles(tmp_path: Path) -> None:
    plan = runner.plan(load_yaml(app_yaml(tmp_path, replicas=2, gpus=2, tp=2), source="t"), "default", 8000)
    assert plan.gpus_needed == {"big": 4.0}
    runner.check_gpus(plan.gpus_needed, 4)
    with pytest.raises(runner.LocalError, match=r"need 4 GPU\(s\) \(big needs 4\) but this machine offers 2;"):
        runner.check_gpus(plan.gpus_needed, 2)
    with pytest.raises(runner.LocalError, match="none detected"):
        runner.check_gpus(plan.gpus_needed, 0)


def test_cpu_apps_need_no_gpu(tmp_path: Path) -> None:
    cpu_app = app_yaml(tmp_path, replicas=2, gpus=1).split("  instanceSpec:")[0] + "  instanceSpec: {}\n"
    plan = runner.plan(load_yaml(cpu_app, source="t"), "default", 8000)
    assert plan.gpus_needed == {}
    runner.check_gpus(plan.gpus_needed, 0)


def test_up_refuses_before_starting_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Any] = []
    monkeypatch.setattr(runner, "start_ray", lambda *a, **k: started.append(a))
    manifest = tmp_path / "app.yaml"
    manifest.write_text(app_yaml(tmp_path, replicas=1, gpus=1))
    result = CliRunner().invoke(app, ["up", "-f", str(manifest), "--num-gpus", "0"])
    assert result.exit_code == 1
    assert "need 1 GPU(s) (big needs 1) but this machine offers 0" in result.output
    assert started == []
