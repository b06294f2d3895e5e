"""A whole model: locked, staged, fetched in parallel, marked complete last, then renamed into place.

Called by the download Job (``python -m arks_ray.models``) and by ``arks-ray model pull`` / ``up``
(``arks_ray.models.local``). For a destination ``<parent>/<name>``:

1. ``<parent>/.<name>.lock`` is taken with ``flock``: concurrent pulls of one model queue, and the
   ones that wait find the marker and download nothing.
2. Files go into ``<parent>/.<name>.partial/`` (kept across crashes, so a re-run resumes), each as a
   ``.part`` until verified. The staging directory records which source it holds; a changed source
   starts from an empty one.
3. The marker (``.arks-complete``, the source digest and every file's size) is written last, then the
   staging directory is renamed to ``<name>`` (a previous version is moved aside and deleted).
   ``<name>`` therefore either does not exist or holds a complete, verified model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from arks_ray.models.archive import unpack
from arks_ray.models.disk import exclusive_lock, fsync_dir, write_durably
from arks_ray.models.fetch import RetryPolicy, fetch
from arks_ray.models.files import MARKER, DownloadError, RemoteFile, check_unique, marker_digest, marker_text
from arks_ray.models.progress import Snapshot, Tracker
from arks_ray.models.transport import Transport

SOURCE_FILE = ".arks-source"


@dataclass(frozen=True)
class PullResult:
    path: Path
    downloaded: bool
    """False: a complete copy was already there (or another puller made it while this one waited)."""
    files: int
    progress: Snapshot | None


def is_complete(dest: Path, digest: str) -> bool:
    try:
        return marker_digest((dest / MARKER).read_text()) == digest
    except OSError:
        return False


def _prepare_staging(staging: Path, digest: str) -> None:
    try:
        held = (staging / SOURCE_FILE).read_text().strip()
    except OSError:
        held = None
    if held != digest and staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    write_durably(staging / SOURCE_FILE, digest)


def _bytes_on_disk(staging: Path, files: list[RemoteFile]) -> int:
    total = 0
    for f in files:
        for candidate in (staging / f.path, staging / (f.path + ".part")):
            if candidate.exists():
                total += candidate.stat().st_size
                break
    return total


def _swap_in(staging: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists() or dest.is_symlink():
        os.replace(dest, old)
    os.replace(staging, dest)
    fsync_dir(dest.parent)
    if old.is_symlink():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def pull(dest: Path, digest: str, resolve: Callable[[], list[RemoteFile]], transport: Transport, *,
         tracker: Tracker | None = None, workers: int = 8, policy: RetryPolicy | None = None,
         sleep: Callable[[float], None] | None = None) -> PullResult:
    """Make ``dest`` a complete copy of the files ``resolve`` lists (called only if work is needed)."""
    if is_complete(dest, digest):
        return PullResult(dest, False, 0, None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dest.parent / f".{dest.name}.lock"):
        if is_complete(dest, digest):
            return PullResult(dest, False, 0, None)
        staging = dest.parent / f".{dest.name}.partial"
        _prepare_staging(staging, digest)
        files = check_unique(resolve())
        if not files:
            raise DownloadError("the source lists no files")
        tracker = tracker or Tracker()
        sizes = [f.size for f in files]
        total = None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)
        tracker.start(len(files), total, _bytes_on_disk(staging, files))
        kwargs = {"sleep": sleep} if sleep is not None else {}
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files))),
                                thread_name_prefix="arks-fetch") as pool:
            futures = {pool.submit(fetch, transport, f, staging / f.path, tracker, policy or RetryPolicy(), **kwargs): f
                       for f in files}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [fut for fut in done if fut.exception() is not None]
            if failed:
                for fut in futures:
                    fut.cancel()
                exc = failed[0].exception()
                assert exc is not None
                raise exc
        got = {f.path: (staging / f.path).stat().st_size for f in files}
        listed = [f for f in files if not f.archive]
        for f in files:
            if f.archive:
                archive = staging / f.path
                for rel in unpack(archive, f.archive, staging):
                    listed.append(RemoteFile(rel, f.url))
                    got[rel] = (staging / rel).stat().st_size
                archive.unlink()
        (staging / SOURCE_FILE).unlink()
        write_durably(staging / MARKER, marker_text(digest, listed, got))
        _swap_in(staging, dest)
        return PullResult(dest, True, len(files), tracker.finish())
