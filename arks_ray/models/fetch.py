"""One file: fetched into a ``.part`` file, resumed with HTTP Range, verified, retried with backoff.

Called by ``arks_ray.models.downloader`` from worker threads. Ordering matters:

1. A ``.part`` file that already holds bytes is resumed from its length (``Range: bytes=N-``); a server
   that answers 200 instead of 206 sends the whole file again, so the part is truncated first.
2. Digests cover the part's existing bytes (read back once) and then the streamed ones.
3. Only a part whose size and digests match is renamed to its final name; a mismatch deletes it and is
   not retried (the source itself is wrong), a cut connection keeps it and is retried.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arks_ray.models.files import ChecksumMismatch, DownloadError, RemoteFile, Retryable
from arks_ray.models.progress import Tracker
from arks_ray.models.transport import Response, Transport, where

CHUNK = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits up to ``min(base * 2**n, cap)`` seconds."""

    attempts: int = 6
    """Tries per file, the first included."""
    base_s: float = 1.0
    """First delay ceiling."""
    cap_s: float = 30.0
    """Largest delay."""

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        return float(min(self.base_s * 2 ** retry, self.cap_s) * (0.5 + 0.5 * rng()))


def _hashers(f: RemoteFile) -> list[Any]:
    out = []
    if f.sha256:
        out.append(("sha256", f.sha256.lower(), hashlib.sha256()))
    if f.md5:
        out.append(("md5", f.md5.lower(), hashlib.md5(usedforsecurity=False)))
    return out


def _prefix_digests(part: Path, hashers: list[Any]) -> None:
    if not hashers or not part.exists():
        return
    with part.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            for _, _, h in hashers:
                h.update(chunk)


def _expected_total(resp: Response, offset: int, f: RemoteFile) -> int | None:
    if resp.status == 206:
        crange = resp.headers.get("content-range", "")
        total = crange.rpartition("/")[2]
        if total.isdigit():
            return int(total)
    length = resp.headers.get("content-length")
    if length and length.isdigit():
        return int(length) + (offset if resp.status == 206 else 0)
    return f.size


def _start_of(resp: Response) -> int:
    crange = resp.headers.get("content-range", "")  # "bytes 100-199/200"
    try:
        return int(crange.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _attempt(transport: Transport, f: RemoteFile, part: Path, tracker: Tracker, known: list[bool]) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if f.size is not None and offset > f.size:
        tracker.advance(-offset)
        part.unlink()
        offset = 0
    resp = transport.get(f.url, f.headers, offset)
    try:
        if resp.status == 416 or (resp.status == 206 and _start_of(resp) != offset) or \
                (resp.status == 200 and offset):
            # The server cannot continue this part (or ignored the Range): start the file again.
            tracker.advance(-offset)
            part.unlink(missing_ok=True)
            if resp.status == 200:
                offset = 0
            else:
                raise Retryable(f"{f.path}: the server refused to resume at byte {offset}")
        elif resp.status not in (200, 206):
            raise DownloadError(f"{f.path}: HTTP {resp.status} from {where(f.url)}")
        total = _expected_total(resp, offset, f)
        if f.size is not None and total is not None and total != f.size:
            raise ChecksumMismatch(f"{f.path}: the server has {total} bytes, the source lists {f.size}")
        if not known[0] and total is not None:
            known[0] = True
            tracker.grow_total(total)
        hashers = _hashers(f)
        _prefix_digests(part, hashers)
        got = offset
        with part.open("ab") as out:
            while True:
                try:
                    chunk = resp.body.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise Retryable(f"{f.path}: connection lost at byte {got}: {type(exc).__name__}") from None
                if not chunk:
                    break
                out.write(chunk)
                for _, _, h in hashers:
                    h.update(chunk)
                got += len(chunk)
                tracker.advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    finally:
        resp.close()
    if total is not None and got < total:
        raise Retryable(f"{f.path}: connection closed at byte {got} of {total}")
    if total is not None and got > total:
        _refuse(part, tracker, got, f"{f.path}: received {got} bytes, expected {total}")
    for name, want, h in hashers:
        if h.hexdigest() != want:
            _refuse(part, tracker, got, f"{f.path}: {name} {h.hexdigest()} does not match the expected {want}")


def _refuse(part: Path, tracker: Tracker, got: int, message: str) -> None:
    part.unlink(missing_ok=True)
    tracker.advance(-got)
    raise ChecksumMismatch(message)


def fetch(transport: Transport, f: RemoteFile, final: Path, tracker: Tracker, policy: RetryPolicy | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Fetch ``f`` to ``final`` (through ``final.part``); returns its size. Raises DownloadError."""
    if final.exists():
        return final.stat().st_size  # verified before it was renamed into place
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    known = [f.size is not None]
    policy = policy or RetryPolicy()
    for retry in range(policy.attempts):
        try:
            _attempt(transport, f, part, tracker, known)
            break
        except Retryable as exc:
            if retry + 1 >= policy.attempts:
                raise DownloadError(f"{exc} (gave up after {policy.attempts} attempts)") from None
            sleep(policy.delay(retry))
    os.replace(part, final)
    tracker.file_done()
    return final.stat().st_size
