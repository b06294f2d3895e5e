"""A raw ``vllm serve`` (vLLM's own OpenAI server) on the tiny model, as a child process group.

Used by the routing end-to-end suite (a static ``routeConfigs`` backend) and by the benchmark that compares
the full stack against raw vLLM. ``stop`` kills the whole process group: EngineCore and its workers too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

# The demo app's engine: configs/examples/local-demo.yaml (runtimeCommonArgs and instanceSpec.env).
ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.1", "--enforce-eager"]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` in its own session."""

    def __init__(self, model_path: str, served_name: str, port: int, log_path: Path, nice: int = 0) -> None:
        self.port = port
        self.log_path = log_path
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *ENGINE_ARGS]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **ENGINE_ENV},
                                     start_new_session=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.started = time.monotonic()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds from the start until ``/health`` answers 200; raises with the log's tail otherwise."""
        deadline = self.started + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; last log lines:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return time.monotonic() - self.started
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve not healthy after {timeout_s:.0f}s; last log lines:\n{self.tail()}")
                time.sleep(0.5)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Children (EngineCore, Worker) share the group; make sure none outlives the leader.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
