"""Model weight download, run as ``python -m arks_ray.weights`` by the ArksModel download Job.

Idempotent and resumable: the hub client resumes partial files, and a marker written last records a
complete download, so a re-run of a finished Job does nothing and a crashed one picks up where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MARKER = ".arks-complete"


def is_complete(dest: Path, repo: str, revision: str | None) -> bool:
    marker = dest / MARKER
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(done.get("repo") == repo and done.get("revision") == revision)


def download(repo: str, dest: Path, revision: str | None = None) -> Path:
    """Download ``repo`` into ``dest`` unless a complete copy is already there."""
    if is_complete(dest, repo, revision):
        print(f"arks-ray: {repo} already complete in {dest}", flush=True)
        return dest
    from huggingface_hub import snapshot_download  # imported here: the Job needs it, nothing else does

    dest.mkdir(parents=True, exist_ok=True)
    print(f"arks-ray: downloading {repo}@{revision or 'main'} into {dest}", flush=True)
    snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest), token=os.environ.get("HF_TOKEN"))
    tmp = dest / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"repo": repo, "revision": revision}))
    os.replace(tmp, dest / MARKER)
    print(f"arks-ray: {repo} complete", flush=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arks_ray.weights", description=__doc__)
    parser.add_argument("--repo", required=True, help="hub repository id")
    parser.add_argument("--dest", required=True, type=Path, help="target directory")
    parser.add_argument("--revision", default=None, help="branch, tag or commit")
    args = parser.parse_args(argv)
    try:
        download(args.repo, args.dest, args.revision)
    except Exception as exc:  # the Job's log is the user's only view: one clear line, non-zero exit
        print(f"arks-ray: download of {args.repo} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
