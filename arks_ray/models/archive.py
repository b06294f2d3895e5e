"""Unpacking a downloaded archive into the staging directory, refusing anything that escapes it.

Called by ``arks_ray.models.downloader`` for ``http`` sources whose URL names a .tar, .tar.gz, .tgz or
.zip. Only regular files and directories are extracted: links, devices and absolute or ``..`` paths are
refused (a hostile archive must not write outside the model directory).
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

from arks_ray.models.files import DownloadError, safe_relpath


def unpack(archive: Path, kind: str, into: Path) -> list[str]:
    """Extract ``archive`` into ``into``; returns the relative paths of the files written."""
    written: list[str] = []
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    rel = safe_relpath(info.filename)
                    target = into / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    written.append(rel)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise DownloadError(f"{archive.name}: {member.name!r} is not a regular file")
                    rel = safe_relpath(member.name)
                    target = into / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    reader = tf.extractfile(member)
                    if reader is None:
                        raise DownloadError(f"{archive.name}: cannot read {member.name!r}")
                    with reader, target.open("wb") as out:
                        shutil.copyfileobj(reader, out, 1 << 20)
                    written.append(rel)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DownloadError(f"{archive.name}: not a valid {kind} archive: {exc}") from None
    return written
