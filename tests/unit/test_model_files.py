"""Pure parts of the downloader: path safety, allow/ignore patterns, archives, markers, backoff."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from arks_ray.models.archive import unpack
from arks_ray.models.fetch import RetryPolicy
from arks_ray.models.files import (
    DownloadError,
    RemoteFile,
    archive_kind,
    check_unique,
    marker_digest,
    marker_text,
    safe_relpath,
    selected,
    source_digest,
)


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "", ".", "a/.arks-complete", ".arks-x"])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(DownloadError):
        safe_relpath(path)


def test_safe_paths_are_normalised() -> None:
    assert safe_relpath("./a//b/c.json") == "a/b/c.json"
    assert safe_relpath("tok\\vocab.json") == "tok/vocab.json"


@pytest.mark.parametrize(("path", "allow", "ignore", "kept"), [
    ("model.safetensors", [], [], True),
    ("model.safetensors", ["*.json"], [], False),
    ("config.json", ["*.json"], [], True),
    ("pytorch_model.bin", [], ["*.bin"], False),
    ("original/consolidated.pth", [], ["original/"], False),
    ("original/params.json", ["*.json"], ["original/*"], False),
    ("sub/config.json", ["*.json"], [], True),  # fnmatch's * crosses '/', as huggingface_hub's does
])
def test_patterns_follow_the_hub_rules(path: str, allow: list[str], ignore: list[str], kept: bool) -> None:
    assert selected(path, allow, ignore) is kept


def test_archive_kinds() -> None:
    assert [archive_kind(n) for n in ("m.tar", "m.TAR.GZ", "m.tgz", "m.zip", "m.safetensors")] == \
        ["tar", "tar", "tar", "zip", None]


def test_two_files_for_one_path_are_refused() -> None:
    with pytest.raises(DownloadError, match=r"config\.json"):
        check_unique([RemoteFile("config.json", "http://a/config.json"), RemoteFile("config.json", "http://b/c")])


def test_the_digest_names_the_source_and_the_marker_records_it() -> None:
    a = source_digest({"s3": {"uri": "s3://b/p"}}, "m")
    assert a != source_digest({"s3": {"uri": "s3://b/q"}}, "m")
    assert a != source_digest({"s3": {"uri": "s3://b/p"}}, "n")
    text = marker_text(a, [RemoteFile("x", "u", 3, "ab")], {"x": 3})
    assert marker_digest(text) == a
    assert marker_digest("not json") is None


def _tar(members: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m in members:
            tf.addfile(m, io.BytesIO(data) if m.isfile() else None)
    return buf.getvalue()


def test_a_tar_that_escapes_is_refused(tmp_path: Path) -> None:
    evil = tarfile.TarInfo("../escape.txt")
    evil.size = 1
    (tmp_path / "a.tar").write_bytes(_tar([evil]))
    with pytest.raises(DownloadError, match="unsafe path"):
        unpack(tmp_path / "a.tar", "tar", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_a_tar_with_a_link_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("weights")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    (tmp_path / "a.tar").write_bytes(_tar([link]))
    with pytest.raises(DownloadError, match="not a regular file"):
        unpack(tmp_path / "a.tar", "tar", tmp_path / "out")


def test_a_zip_unpacks_and_reports_its_files(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m/config.json", "{}")
        zf.writestr("m/model.safetensors", b"\0" * 10)
    (tmp_path / "a.zip").write_bytes(buf.getvalue())
    assert sorted(unpack(tmp_path / "a.zip", "zip", tmp_path / "out")) == ["m/config.json", "m/model.safetensors"]
    assert (tmp_path / "out" / "m" / "model.safetensors").stat().st_size == 10


def test_a_broken_archive_says_so(tmp_path: Path) -> None:
    (tmp_path / "a.zip").write_bytes(b"not a zip")
    with pytest.raises(DownloadError, match="not a valid zip"):
        unpack(tmp_path / "a.zip", "zip", tmp_path / "out")


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    policy = RetryPolicy(attempts=8, base_s=1.0, cap_s=10.0)
    assert [policy.delay(n, rng=lambda: 1.0) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(3, rng=lambda: 0.0) == 4.0
