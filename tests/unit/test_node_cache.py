"""The node-local cache's copy step (``arks_ray.models.node_cache``) on real files and real processes:
copied once, marker last, current copies left alone, concurrent pods on one node copying once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from arks_ray.models.files import MARKER, RemoteFile, marker_text
from arks_ray.models.node_cache import CacheError, cache_model, main

ROOT = Path(__file__).resolve().parents[2]


def make_model(path: Path, digest: str = "d1", size: int = 300_000) -> Path:
    """A complete model as the downloader leaves it: files, then the marker naming their sizes."""
    path.mkdir(parents=True)
    files = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(size), "sub/tokenizer.json": b"{}"}
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    listed = [RemoteFile(rel, "http://x/" + rel) for rel in files]
    (path / MARKER).write_text(marker_text(digest, listed, {rel: len(d) for rel, d in files.items()}))
    return path


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_copies_a_complete_model_then_nothing(tmp_path: Path) -> None:
    src = make_model(tmp_path / "shared" / "tiny")
    first = cache_model(src, tmp_path / "node")
    assert first.copied
    assert first.files == 3
    assert first.path == tmp_path / "node" / "tiny"
    assert tree(first.path) == tree(src)
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == [".tiny.lock", "tiny"]  # no staging left
    inode = (first.path / "model.safetensors").stat().st_ino
    again = cache_model(src, tmp_path / "node")
    assert not again.copied
    assert (first.path / "model.safetensors").stat().st_ino == inode


def test_an_incomplete_source_is_refused_and_nothing_appears(tmp_path: Path) -> None:
    src = make_model(tmp_path / "shared" / "tiny")
    (src / MARKER).unlink()
    with pytest.raises(CacheError, match="not a complete model"):
        cache_model(src, tmp_path / "node")
    assert not (tmp_path / "node" / "tiny").exists()


def test_a_file_that_differs_from_the_marker_is_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "shared" / "tiny")
    (src / "model.safetensors").write_bytes(b"short")
    with pytest.raises(CacheError, match=r"model\.safetensors"):
        cache_model(src, tmp_path / "node")
    assert not (tmp_path / "node" / "tiny").exists()
    assert not (tmp_path / "node" / ".tiny.partial").exists()


def test_a_new_download_replaces_the_copy_and_a_cut_copy_is_redone(tmp_path: Path) -> None:
    src = make_model(tmp_path / "shared" / "v1" / "tiny", digest="v1")
    cache_model(src, tmp_path / "node", "ns.tiny")
    # A copy cut short (the pod was killed): staging without a marker, never taken for the model.
    stale = tmp_path / "node" / ".ns.tiny.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    newer = make_model(tmp_path / "shared" / "v2" / "tiny", digest="v2")
    result = cache_model(newer, tmp_path / "node", "ns.tiny")
    assert result.copied
    assert tree(result.path) == tree(newer)
    assert not stale.exists()


def test_bad_keys_are_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "tiny")
    for key in ("a/b", ".hidden", ".."):
        with pytest.raises(CacheError, match="bad cache key"):
            cache_model(src, tmp_path / "node", key)


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_model(tmp_path / "shared" / "tiny")
    assert main(["--source", str(src), "--cache", str(tmp_path / "node"), "--key", "k"]) == 0
    assert "copied 3 files" in capsys.readouterr().out
    assert main(["--source", str(src), "--cache", str(tmp_path / "node"), "--key", "k"]) == 0
    assert "is current, nothing copied" in capsys.readouterr().out
    assert main(["--source", str(tmp_path / "missing"), "--cache", str(tmp_path / "node")]) == 1


def test_concurrent_pods_on_one_node_copy_once(tmp_path: Path) -> None:
    src = make_model(tmp_path / "shared" / "tiny", size=8 << 20)
    cmd = [sys.executable, "-m", "arks_ray.models.node_cache", "--source", str(src), "--cache", str(tmp_path / "node")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    copied = [out for out, _ in outs if "copied 3 files" in out]
    assert len(copied) == 1
    assert sum("nothing copied" in out for out, _ in outs) == 3
    assert tree(tmp_path / "node" / "tiny") == tree(src)
