"""The node-local cache tier: copy a complete model from the shared claim onto the node's own disk, once.

Run as ``python -m arks_ray.models.node_cache --source DIR --cache DIR [--key KEY]`` by the init
container the renderer adds to every worker pod (and to the preload DaemonSet) of a model with
``spec.cache.nodeLocal`` (``arks_ray.render.node_cache``). For ``<cache>/<key>``:

1. The source must be complete: it holds the downloader's marker (``.arks-complete``), else nothing is
   copied and the run fails (the init container retries).
2. A copy is current when its marker has the same content as the source's (same download, same files);
   then nothing is copied.
3. Otherwise ``<cache>/.<key>.lock`` is taken with ``flock`` (pods starting together on one node queue,
   and the ones that waited find a current copy), files are copied into ``<cache>/.<key>.partial/`` and
   checked against the sizes the marker records, the marker is written last, and the staging directory
   is renamed to ``<key>`` in one step (an older copy is moved aside and deleted). ``<key>`` therefore
   either does not exist or holds a complete copy.

Nothing here evicts: copies of other models stay until removed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from arks_ray.models.disk import exclusive_lock, write_durably
from arks_ray.models.downloader import _swap_in
from arks_ray.models.files import MARKER


class CacheError(Exception):
    """The source is not a complete model, or the copy does not match it."""


@dataclass(frozen=True)
class CacheResult:
    path: Path
    copied: bool
    """False: a current copy was already there (or another pod made it while this one waited)."""
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0


def _marker(directory: Path) -> str | None:
    try:
        return (directory / MARKER).read_text()
    except OSError:
        return None


def _check_key(key: str) -> str:
    if not key or "/" in key or key.startswith(".") or key in ("..",):
        raise CacheError(f"bad cache key {key!r}: one path segment, not starting with '.'")
    return key


def _expected_sizes(marker: str) -> dict[str, int]:
    try:
        files = json.loads(marker).get("files") or {}
    except (json.JSONDecodeError, AttributeError):
        raise CacheError("the source's completion marker is unreadable") from None
    return {str(path): int(info["size"]) for path, info in files.items()
            if isinstance(info, dict) and isinstance(info.get("size"), int)}


def _copy_tree(source: Path, staging: Path) -> tuple[int, int]:
    files = total = 0
    for root, dirs, names in os.walk(source):
        dirs.sort()
        rel_root = Path(root).relative_to(source)
        (staging / rel_root).mkdir(parents=True, exist_ok=True)
        for name in sorted(names):
            if rel_root == Path(".") and name == MARKER:
                continue  # written last, after every file is in place
            src, dst = Path(root) / name, staging / rel_root / name
            shutil.copyfile(src, dst)  # copy_file_range/sendfile on Linux: no user-space buffer
            with dst.open("rb") as fh:
                os.fsync(fh.fileno())
            files += 1
            total += dst.stat().st_size
    return files, total


def is_current(dest: Path, source_marker: str) -> bool:
    return _marker(dest) == source_marker


def cache_model(source: Path, cache: Path, key: str | None = None) -> CacheResult:
    """Make ``<cache>/<key>`` (key default: the source's directory name) a complete copy of ``source``."""
    key = _check_key(key or source.name)
    dest = cache / key
    wanted = _marker(source)
    if wanted is None:
        raise CacheError(f"{source} is not a complete model (no {MARKER}); the download has not finished")
    if is_current(dest, wanted):
        return CacheResult(dest, False)
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache / f".{key}.lock"):
        if is_current(dest, wanted):
            return CacheResult(dest, False)
        started = time.perf_counter()
        staging = cache / f".{key}.partial"
        if staging.exists():
            shutil.rmtree(staging)  # a copy cut short: the lock is ours, so nobody else is writing it
        files, total = _copy_tree(source, staging)
        for rel, size in _expected_sizes(wanted).items():
            got = staging / rel
            if not got.is_file() or got.stat().st_size != size:
                shutil.rmtree(staging, ignore_errors=True)
                raise CacheError(f"{rel}: the shared copy does not match its marker (size), not cached")
        write_durably(staging / MARKER, wanted)
        _swap_in(staging, dest)
        return CacheResult(dest, True, files, total, time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arks_ray.models.node_cache",
                                     description="Copy a complete model into the node-local cache, once.")
    parser.add_argument("--source", required=True, type=Path, help="the complete model directory (shared copy)")
    parser.add_argument("--cache", required=True, type=Path, help="the node-local cache directory")
    parser.add_argument("--key", help="name of the copy under --cache; default the source's directory name")
    args = parser.parse_args(argv)
    try:
        result = cache_model(args.source, args.cache, args.key)
    except (CacheError, OSError) as exc:
        print(f"node cache: {exc}", file=sys.stderr)
        return 1
    if result.copied:
        rate = result.bytes / result.seconds / 2**20 if result.seconds else 0.0
        print(f"node cache: copied {result.files} files, {result.bytes / 2**20:.1f} MiB into {result.path} "
              f"in {result.seconds:.1f}s ({rate:.0f} MiB/s)")
    else:
        print(f"node cache: {result.path} is current, nothing copied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
