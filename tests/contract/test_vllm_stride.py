"""The stride against a real vLLM (the CPU build): set on vLLM's output processor as ``ArksLLMServer`` sets it
(``deployments.vllm_engine.output_processor``), a new request's tokens come in one output for the first, then one
per stride, the end included; set back to 1, every token comes on its own. The rule that picks the stride and the
server's use of it are unit-tested (``tests/unit/test_engine_stride.py``); on a GPU it is measured by
``benchmarks/gpu_side_by_side.py`` (README, Performance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

pytest.importorskip("vllm")

SCRIPT = """
import asyncio, json, os, sys
from types import SimpleNamespace
sys.path.insert(0, {root!r})

async def main(model):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from deployments.vllm_engine import output_processor

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, dtype="bfloat16", max_model_len=512,
                                                       enforce_eager=True))
    outputs = output_processor(SimpleNamespace(_engine_client=engine))

    async def deltas(rid):
        params = SamplingParams(max_tokens=17, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        return [len(out.outputs[0].token_ids) async for out in engine.generate("hello", params, request_id=rid)]

    found = outputs is not None
    outputs.stream_interval = 4
    strided = await deltas("strided")
    outputs.stream_interval = 1
    every = await deltas("every")
    engine.shutdown()
    print(json.dumps({{"found": found, "strided": strided, "every": every}}))

if __name__ == "__main__":
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    asyncio.run(main(sys.argv[1]))
"""


def test_a_real_vllm_hands_over_a_streams_tokens_once_per_stride_set_on_its_output_processor(tmp_path: Path) -> None:
    from arks_ray.local.tinymodel import ensure_tiny_model

    model = ensure_tiny_model(tmp_path / "models")
    script = tmp_path / "stride_probe.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    done = subprocess.run([sys.executable, str(script), str(model)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["found"] is True
    assert got["strided"] == [1, 4, 4, 4, 4]  # the first token at once, then every 4, the 17th ending it
    assert got["every"] == [1] * 17
