"""What a download is made of, as data: remote files, path rules, patterns and the completion marker. Pure.

Used by ``arks_ray.models.sources`` (which builds ``RemoteFile`` lists) and ``arks_ray.models.downloader``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

MARKER = ".arks-complete"
"""Written last into a finished model directory: without it a directory is not a model."""
ARCHIVE_SUFFIXES = {".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".zip": "zip"}


class DownloadError(Exception):
    """A download that cannot succeed as configured; the message says which file and why."""


class Retryable(DownloadError):
    """A failure worth another try: a cut connection, a timeout, a 5xx or 429."""


class ChecksumMismatch(DownloadError):
    """A file whose size or digest differs from what its source promised; it is deleted, never used."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch into the model directory."""

    path: str
    """Relative path inside the model directory (POSIX, no ``..``)."""
    url: str
    """Where to GET it. May carry a signature (S3 presigned): never print it."""
    size: int | None = None
    """Expected size in bytes, if the source says."""
    sha256: str | None = None
    """Expected SHA-256, hex, if the source says."""
    md5: str | None = None
    """Expected MD5, hex (an S3 ETag of a single-part upload)."""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Request headers such as ``Authorization``; never printed."""
    archive: str | None = None
    """``tar`` or ``zip``: unpack into the model directory once verified, then delete."""


def safe_relpath(path: str) -> str:
    """``path`` as a clean relative POSIX path; raises DownloadError for absolute paths and ``..``."""
    parts = [p for p in PurePosixPath(path.replace("\\", "/")).parts if p not in ("", ".")]
    if not parts or path.startswith("/") or ".." in parts:
        raise DownloadError(f"unsafe path in model: {path!r}")
    if parts[-1] == MARKER or any(p.startswith(".arks-") for p in parts):
        raise DownloadError(f"reserved name in model: {path!r}")
    return "/".join(parts)


def selected(path: str, allow: Sequence[str], ignore: Sequence[str]) -> bool:
    """Hugging Face's rule: kept if it matches an allow pattern (or none are given) and no ignore pattern.
    A pattern ending in ``/`` means everything below that directory."""
    def matches(pattern: str) -> bool:
        pattern = pattern + "*" if pattern.endswith("/") else pattern
        return fnmatch.fnmatchcase(path, pattern)

    return (not allow or any(matches(p) for p in allow)) and not any(matches(p) for p in ignore)


def archive_kind(name: str) -> str | None:
    low = name.lower()
    return next((kind for suffix, kind in ARCHIVE_SUFFIXES.items() if low.endswith(suffix)), None)


def check_unique(files: Iterable[RemoteFile]) -> list[RemoteFile]:
    """The files, refusing two with the same path (two URLs ending in the same name)."""
    seen: dict[str, RemoteFile] = {}
    for f in files:
        if f.path in seen:
            raise DownloadError(f"two files would be written to {f.path!r}; give them distinct paths")
        seen[f.path] = f
    return list(seen.values())


def source_digest(source: Mapping[str, Any], model_id: str) -> str:
    """What identifies a download's content: the model id and its source (secret names, not values)."""
    text = json.dumps({"model": model_id, "source": source}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def marker_text(digest: str, files: Sequence[RemoteFile], sizes: Mapping[str, int]) -> str:
    """The marker's content: which source, and every file with its verified size and checksum."""
    return json.dumps({
        "source": digest,
        "files": {f.path: {"size": sizes.get(f.path, f.size), "sha256": f.sha256} for f in files},
    }, sort_keys=True, indent=1)


def marker_digest(text: str) -> str | None:
    """The source digest a marker records, or None for an unreadable marker."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    value = data.get("source") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
