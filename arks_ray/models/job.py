"""The download Job's entry point: ``python -m arks_ray.models --model-id ID --source JSON --dest DIR``.

Rendered by ``arks_ray.render.models.render_download_job``. Credentials come from the environment
(the Job maps its Secret's keys onto variables of the same names). Progress goes to stdout as a human
line and an ``arks-progress {json}`` line every few seconds; the operator reads the last one back into
``ArksModel.status``. A failure prints one ``arks-ray: download failed: ...`` line and exits 1, and
the Job's retry (and the operator's backoff) runs the same command again, which resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from arks_ray.api.model import ModelSource
from arks_ray.models.downloader import PullResult, pull
from arks_ray.models.fetch import RetryPolicy
from arks_ray.models.files import DownloadError, source_digest
from arks_ray.models.progress import ReportSink, Sink, Tracker, describe
from arks_ray.models.sources import CREDENTIAL_KEYS, resolver
from arks_ray.models.transport import Transport, UrllibTransport


def credentials(source: ModelSource, env: Mapping[str, str]) -> dict[str, str]:
    keys = (*CREDENTIAL_KEYS.get(source.kind or "", ()), "HF_ENDPOINT", "MODELSCOPE_DOMAIN")
    return {k: env[k] for k in keys if env.get(k)}


def pull_source(model_id: str, source: ModelSource, dest: Path, creds: Mapping[str, str], sink: Sink,
                transport: Transport | None = None, workers: int = 8, attempts: int = 6) -> PullResult:
    """Download one model's source into ``dest`` (the function the Job and the CLI share)."""
    transport = transport or UrllibTransport()
    digest = source_digest(source.model_dump(by_alias=True, exclude_none=True, mode="json"), model_id)
    return pull(dest, digest, resolver(source, model_id, creds, transport), transport,
                tracker=Tracker(sink=sink), workers=workers, policy=RetryPolicy(attempts=max(1, attempts)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arks_ray.models", description=__doc__)
    parser.add_argument("--model-id", required=True, help="spec.model of the ArksModel")
    parser.add_argument("--source", required=True, help="spec.source of the ArksModel, as JSON")
    parser.add_argument("--dest", required=True, type=Path, help="the model directory to create")
    parser.add_argument("--workers", type=int, default=8, help="files fetched in parallel")
    parser.add_argument("--attempts", type=int, default=6, help="tries per file before the pull fails")
    args = parser.parse_args(argv)
    try:
        source = ModelSource.model_validate(json.loads(args.source))
        result = pull_source(args.model_id, source, args.dest, credentials(source, os.environ),
                             ReportSink(sys.stdout), workers=args.workers, attempts=args.attempts)
    except (DownloadError, ValueError, OSError) as exc:
        # The Job's log is the user's only view: one clear line, non-zero exit.
        print(f"arks-ray: download failed: {exc}", file=sys.stderr, flush=True)
        return 1
    if result.downloaded and result.progress is not None:
        print(f"arks-ray: {args.model_id} complete in {args.dest}: {describe(result.progress)}", flush=True)
    else:
        print(f"arks-ray: {args.model_id} already complete in {args.dest}", flush=True)
    return 0
