"""The model downloader against real servers on loopback: HTTP (resume, checksum, concurrency,
archives), the Hugging Face and ModelScope listings through a local endpoint, and S3 through moto.

Each test drives ``arks_ray.models.job.pull_source``, the function the download Job and
``arks-ray model pull`` both run.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from arks_ray.api.model import ModelSource
from arks_ray.models.files import MARKER, DownloadError
from arks_ray.models.job import pull_source
from arks_ray.models.progress import NullSink, Snapshot, parse_report
from tests.support.model_servers import MOTO, Behaviour, FileServer, MotoServer

pytestmark = pytest.mark.integration

FILES = {"config.json": b'{"model_type": "qwen2"}', "model.safetensors": os.urandom(3 << 20),
         "tokenizer/vocab.json": b'{"a": 1}'}


def source(**kind: Any) -> ModelSource:
    return ModelSource.model_validate(kind)


def http_source(server: FileServer, names: list[str], sha: dict[str, str] | None = None) -> ModelSource:
    files = [{"url": f"{server.url}/files/{n}", "path": n, **({"sha256": sha[n]} if sha and n in sha else {})}
             for n in names]
    return source(http={"files": files})


def assert_model(dest: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    marker = json.loads((dest / MARKER).read_text())
    assert set(marker["files"]) == set(files)
    assert not list(dest.parent.glob(f".{dest.name}.partial"))


class Sink:
    def __init__(self) -> None:
        self.snaps: list[Snapshot] = []

    def update(self, snap: Snapshot, final: bool = False) -> None:
        self.snaps.append(snap)


def test_http_files_verified_with_progress_and_idempotent(tmp_path: Path) -> None:
    sha = {n: hashlib.sha256(b).hexdigest() for n, b in FILES.items()}
    with FileServer(FILES) as server:
        src = http_source(server, list(FILES), sha)
        sink = Sink()
        result = pull_source("acme/tiny", src, tmp_path / "m", {}, sink)
        assert result.downloaded
        assert_model(tmp_path / "m", FILES)
        final = sink.snaps[-1]
        assert (final.bytes_done, final.bytes_total) == (sum(map(len, FILES.values())),) * 2
        assert (final.files_done, final.files_total) == (3, 3)
        again = pull_source("acme/tiny", src, tmp_path / "m", {}, NullSink())
        assert not again.downloaded
        assert sum(server.gets.values()) == 3


def test_a_connection_cut_halfway_resumes_with_a_range_request(tmp_path: Path) -> None:
    data = FILES["model.safetensors"]
    with FileServer({"model.safetensors": data}, Behaviour(cut_once={"model.safetensors"})) as server:
        src = http_source(server, ["model.safetensors"], {"model.safetensors": hashlib.sha256(data).hexdigest()})
        pull_source("acme/tiny", src, tmp_path / "m", {}, NullSink())
        assert (tmp_path / "m" / "model.safetensors").read_bytes() == data
        (_, r1), (_, r2) = server.ranges
        assert r1 is None
        assert r2 is not None
        assert 0 < int(r2.removeprefix("bytes=").rstrip("-")) < len(data)


def test_a_server_that_ignores_range_restarts_the_file(tmp_path: Path) -> None:
    data = FILES["model.safetensors"]
    with FileServer({"m.bin": data}, Behaviour(cut_once={"m.bin"}, ignore_range=True)) as server:
        pull_source("x", http_source(server, ["m.bin"]), tmp_path / "m", {}, NullSink())
        assert (tmp_path / "m" / "m.bin").read_bytes() == data
        assert server.gets["m.bin"] == 2


def test_a_checksum_mismatch_is_refused_and_nothing_is_left_as_a_model(tmp_path: Path) -> None:
    with FileServer(FILES, Behaviour(corrupt={"model.safetensors"})) as server:
        sha = {n: hashlib.sha256(b).hexdigest() for n, b in FILES.items()}
        with pytest.raises(DownloadError, match=r"model.safetensors: sha256 .* does not match"):
            pull_source("x", http_source(server, list(FILES), sha), tmp_path / "m", {}, NullSink())
        assert not (tmp_path / "m").exists()
        staging = tmp_path / ".m.partial"
        assert not (staging / "model.safetensors").exists()
        assert not (staging / "model.safetensors.part").exists()
        assert server.gets["model.safetensors"] == 1  # a wrong file is not fetched again and again


def test_a_crash_leaves_no_model_and_the_next_pull_resumes(tmp_path: Path) -> None:
    """A pull killed mid-file: no directory at the destination; the re-run fetches only the rest."""
    data = os.urandom(8 << 20)
    with FileServer({"big.bin": data}, Behaviour(delay_s=0.0)) as server:
        src = http_source(server, ["big.bin"])
        code = ("import sys, json, pathlib; from arks_ray.api.model import ModelSource\n"
                "from arks_ray.models import fetch\n"
                "fetch.CHUNK = 65536\n"
                "orig = fetch.Tracker.advance\n"
                "def advance(self, n):\n"
                "    orig(self, n)\n"
                "    if self.bytes_done > (3 << 20): import os; os._exit(9)\n"
                "fetch.Tracker.advance = advance\n"
                "from arks_ray.models.job import pull_source\n"
                "from arks_ray.models.progress import NullSink\n"
                "pull_source('x', ModelSource.model_validate(json.loads(sys.argv[1])), pathlib.Path(sys.argv[2]), "
                "{}, NullSink())\n")
        proc = subprocess.run([sys.executable, "-c", code, src.model_dump_json(by_alias=True, exclude_none=True),
                               str(tmp_path / "m")], capture_output=True, check=False)
        assert proc.returncode == 9, proc.stderr
        assert not (tmp_path / "m").exists()
        part = tmp_path / ".m.partial" / "big.bin.part"
        kept = part.stat().st_size
        assert kept > (3 << 20) - (1 << 16)
        pull_source("x", src, tmp_path / "m", {}, NullSink())
        assert (tmp_path / "m" / "big.bin").read_bytes() == data
        assert server.ranges[-1] == ("big.bin", f"bytes={kept}-")


def test_concurrent_pulls_of_one_model_download_once(tmp_path: Path) -> None:
    with FileServer(FILES, Behaviour(delay_s=0.2)) as server:
        src = http_source(server, list(FILES))
        results: list[bool] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                results.append(pull_source("x", src, tmp_path / "m", {}, NullSink()).downloaded)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert sorted(results) == [False, False, False, True]
        assert dict(server.gets) == dict.fromkeys(FILES, 1)
        assert_model(tmp_path / "m", FILES)


def test_an_archive_is_unpacked_into_the_model_directory(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with FileServer({"tiny.tar.gz": buf.getvalue()}) as server:
        src = source(http={"urls": [f"{server.url}/files/tiny.tar.gz"]})
        pull_source("x", src, tmp_path / "m", {}, NullSink())
        assert_model(tmp_path / "m", FILES)
        assert not (tmp_path / "m" / "tiny.tar.gz").exists()


def test_a_changed_source_replaces_the_model(tmp_path: Path) -> None:
    with FileServer({"a.json": b"1", "b.json": b"2"}) as server:
        pull_source("x", http_source(server, ["a.json"]), tmp_path / "m", {}, NullSink())
        pull_source("x", http_source(server, ["b.json"]), tmp_path / "m", {}, NullSink())
        assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [MARKER, "b.json"]


def test_huggingface_through_its_client_at_a_local_endpoint(tmp_path: Path) -> None:
    """huggingface_hub's own listing (its tree API, with the LFS SHA-256) then our resumable fetch; the
    token reaches the endpoint; allow/ignore patterns filter."""
    with FileServer(FILES, token="hf_secret") as server:
        src = source(huggingface={"endpoint": server.url, "revision": "v1", "tokenSecretRef": {"name": "hf"},
                                  "ignorePatterns": ["tokenizer/"]})
        pull_source("acme/tiny", src, tmp_path / "m", {"HF_TOKEN": "hf_secret"}, NullSink())
        assert_model(tmp_path / "m", {k: v for k, v in FILES.items() if not k.startswith("tokenizer/")})
        assert not (tmp_path / "m" / "tokenizer").exists()
        with pytest.raises(DownloadError, match="HTTP 401"):
            pull_source("acme/tiny", src, tmp_path / "n", {"HF_TOKEN": "wrong"}, NullSink())


def test_the_hub_token_is_not_sent_on_to_another_host(tmp_path: Path) -> None:
    """The hub answers file URLs with a redirect to its CDN (another host): the CDN gets no token."""
    with FileServer(FILES) as cdn:
        cdn_url = cdn.url.replace("127.0.0.1", "localhost")  # another host name, the same server
        with FileServer(FILES, token="hf_secret", redirect_to=cdn_url) as hub:
            src = source(huggingface={"endpoint": hub.url, "tokenSecretRef": {"name": "hf"}})
            pull_source("acme/tiny", src, tmp_path / "m", {"HF_TOKEN": "hf_secret"}, NullSink())
        assert_model(tmp_path / "m", FILES)
        assert set(hub.auth_seen) == {"Bearer hf_secret"}
        assert cdn.auth_seen == [None] * len(FILES)


def test_huggingface_refuses_a_file_whose_lfs_sha_differs(tmp_path: Path) -> None:
    with FileServer(FILES, Behaviour(corrupt={"model.safetensors"})) as server:
        src = source(huggingface={"endpoint": server.url})
        with pytest.raises(DownloadError, match="sha256"):
            pull_source("acme/tiny", src, tmp_path / "m", {}, NullSink())


def test_modelscope_listing_at_a_local_endpoint(tmp_path: Path) -> None:
    with FileServer(FILES) as server:
        src = source(modelscope={"endpoint": server.url, "allowPatterns": ["*.json", "*.safetensors"]})
        pull_source("acme/tiny", src, tmp_path / "m", {}, NullSink())
        assert_model(tmp_path / "m", FILES)


@pytest.fixture(scope="module")
def s3() -> Any:
    if not MOTO.exists():
        pytest.fail(f"{MOTO} is missing: `make s3-venv` installs moto's server")
    with MotoServer() as server:
        yield server


def s3_put(server: MotoServer, bucket: str, objects: dict[str, bytes], sha_header: bool = False) -> None:
    from minio import Minio

    client = Minio(server.url.removeprefix("http://"), "test", "test", secure=False, region="us-east-1")
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    for key, data in objects.items():
        meta = {"x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
                "x-amz-sdk-checksum-algorithm": "SHA256"} if sha_header else None
        client.put_object(bucket, key, io.BytesIO(data), len(data), metadata=meta)


def test_s3_prefix_with_credentials_from_the_secret(tmp_path: Path, s3: MotoServer) -> None:
    s3_put(s3, "models", {f"acme/tiny-chat/{k}": v for k, v in FILES.items()} | {"acme/other/x.json": b"{}"})
    src = source(s3={"uri": "s3://models/acme/tiny-chat", "endpoint": s3.url, "region": "us-east-1",
                     "credentialsSecretRef": {"name": "s3-creds"}})
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    sink = Sink()
    pull_source("acme/tiny-chat", src, tmp_path / "m", creds, sink)
    assert_model(tmp_path / "m", FILES)
    assert sink.snaps[-1].bytes_total == sum(map(len, FILES.values()))


def test_s3_etag_md5_and_sha256_checksums_are_checked(tmp_path: Path, s3: MotoServer) -> None:
    from arks_ray.api.model import S3Source
    from arks_ray.models.sources import s3_files

    s3_put(s3, "sums", {"m/a.bin": b"abc"}, sha_header=True)
    (f,) = s3_files(S3Source(uri="s3://sums/m", endpoint=s3.url, region="us-east-1"),
                    {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    assert f.md5 == hashlib.md5(b"abc").hexdigest()
    assert f.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert "X-Amz-Signature" in f.url


def test_s3_without_credentials_is_denied(tmp_path: Path, s3: MotoServer) -> None:
    s3_put(s3, "private", {"m/a.json": b"{}"})
    src = source(s3={"uri": "s3://private/m", "endpoint": s3.url, "region": "us-east-1"})
    with pytest.raises(DownloadError, match="AccessDenied"):
        pull_source("x", src, tmp_path / "m", {}, NullSink())


def test_s3_missing_bucket_says_so(tmp_path: Path, s3: MotoServer) -> None:
    src = source(s3={"uri": "s3://absent/x", "endpoint": s3.url, "region": "us-east-1"})
    with pytest.raises(DownloadError, match="NoSuchBucket"):
        pull_source("x", src, tmp_path / "m", {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}, NullSink())


def test_the_job_command_prints_progress_reports(tmp_path: Path) -> None:
    with FileServer(FILES) as server:
        src = http_source(server, list(FILES))
        proc = subprocess.run([sys.executable, "-m", "arks_ray.models", "--model-id", "x", "--source",
                               src.model_dump_json(by_alias=True, exclude_none=True), "--dest", str(tmp_path / "m")],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        snap = parse_report(proc.stdout)
        assert snap is not None
        assert (snap.files_done, snap.bytes_done) == (3, sum(map(len, FILES.values())))
        assert "complete in" in proc.stdout
        bad = subprocess.run([sys.executable, "-m", "arks_ray.models", "--attempts", "1", "--model-id", "x",
                              "--source",
                              '{"http": {"urls": ["http://127.0.0.1:1/x.json"]}}', "--dest", str(tmp_path / "n")],
                             capture_output=True, text=True, check=False, env={**os.environ})
        assert bad.returncode == 1
        assert bad.stderr.startswith("arks-ray: download failed:")


def test_cli_model_pull_reads_the_secret_from_the_same_file(tmp_path: Path, s3: MotoServer) -> None:
    """`arks-ray model pull -f FILE --cache-dir DIR`: the S3 credentials come from the Secret in FILE, two
    ArksModels with one source share one copy, and a second run downloads nothing."""
    from typer.testing import CliRunner

    from arks_ray.cli import app

    s3_put(s3, "cli", {f"tiny/{k}": v for k, v in FILES.items()})
    manifest = tmp_path / "models.yaml"
    model = """---
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {{name: {name}}}
spec:
  model: acme/tiny-chat
  source:
    s3: {{uri: "s3://cli/tiny", endpoint: "{url}", region: us-east-1, credentialsSecretRef: {{name: s3-creds}}}}
  storage: {{pvc: {{spec: {{resources: {{requests: {{storage: 1Gi}}}}}}}}}}
"""
    manifest.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s3-creds}\n"
        "stringData: {AWS_ACCESS_KEY_ID: AKIDCLI, AWS_SECRET_ACCESS_KEY: s3cr3t-cli-value}\n"
        + model.format(name="tiny-a", url=s3.url) + model.format(name="tiny-b", url=s3.url))
    result = CliRunner().invoke(app, ["model", "pull", "-f", str(manifest), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert_model(entry, FILES)
    assert "pulled default/tiny-a" in result.output
    assert "default/tiny-b is already in" in result.output
    assert "s3cr3t-cli-value" not in result.output
    assert "X-Amz-Signature" not in result.output
    again = CliRunner().invoke(app, ["model", "pull", "-f", str(manifest), "--cache-dir", str(tmp_path / "cache")])
    assert again.exit_code == 0
    assert "pulled" not in again.output


def test_point_at_cache_rewrites_only_the_pulled_model(tmp_path: Path) -> None:
    from arks_ray.api.model import ArksModel
    from arks_ray.models.local import Pulled, point_at_cache

    m = ArksModel.model_validate({"metadata": {"name": "a"}, "spec": {"model": "acme/a", "source": {
        "huggingface": {}}, "storage": {"pvc": {"spec": {}}}}})
    config = {"applications": [
        {"args": {"llm_config": {"model_loading_config": {"model_source": "acme/a"}}}},
        {"args": {"llm_config": {"model_loading_config": {"model_source": "acme/b"},
                                 "engine_kwargs": {"model_path": "acme/a"}}}}]}
    assert point_at_cache(config, [Pulled(m, tmp_path / "a", "")]) == 2
    apps = config["applications"]
    assert apps[0]["args"]["llm_config"]["model_loading_config"]["model_source"] == str(tmp_path / "a")
    assert apps[1]["args"]["llm_config"]["model_loading_config"]["model_source"] == "acme/b"
    assert apps[1]["args"]["llm_config"]["engine_kwargs"]["model_path"] == str(tmp_path / "a")


async def test_the_operator_reports_download_progress_on_the_emulator(operators: Any, kubectl: Any,
                                                                        emulator: Any) -> None:
    """The real operator on kmock's Kubernetes emulator: an s3 ArksModel gets its download Job; the Job's
    pod logs a progress report (as ``python -m arks_ray.models`` prints it); the operator reads the log
    and shows the report in ``status.progress``."""
    from arks_ray.models.progress import report_line
    from tests.integration.harness import eventually

    await operators.start()
    await kubectl.apply({"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": "tiny"}, "spec": {
        "model": "acme/tiny-chat", "source": {"s3": {"uri": "s3://models/acme/tiny-chat"}},
        "storage": {"pvc": {"spec": {"resources": {"requests": {"storage": "1Gi"}}}}}}})
    await eventually(lambda: kubectl.get("Job", "arks-model-tiny"))
    report = report_line(Snapshot(3 << 20, 12 << 20, 1, 4, float(1 << 20), 9.0, 3.0))
    emulator["get /api/v1/namespaces/default/pods/arks-model-tiny-x7k2p/log"] << f"arks-ray: ...\n{report}\n".encode()
    await kubectl.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "arks-model-tiny-x7k2p", "labels": {"job-name": "arks-model-tiny"}}, "status": {"phase": "Running"}})
    # The Job controller marks the Job active; that status change wakes the operator.
    await kubectl.patch("Job", "arks-model-tiny", {"status": {"active": 1}}, sub="status")

    async def progress() -> dict[str, Any] | None:
        model = await kubectl.get("ArksModel", "tiny")
        return model["status"] if model and (model.get("status") or {}).get("progress") else None

    status = await eventually(progress, within=20)
    assert status["phase"] == "ModelLoading"
    assert status["progress"] == "3.0 MiB / 12.0 MiB (25%), 1/4 files, 1.0 MiB/s, ETA 9s"
    assert status["download"]["filesTotal"] == 4


def test_up_pulls_the_model_and_serves_it_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`arks-ray up` with an http-source model: the model is pulled (with the Job's code) before Ray is
    started, and the deployed Serve config loads it from the cache. Ray itself is replaced here: only the
    wiring between the pull and the deploy is under test."""
    import yaml
    from typer.testing import CliRunner

    from arks_ray.cli import app
    from arks_ray.local import runner

    monkeypatch.setenv("ARKS_RAY_CACHE", str(tmp_path / "cache"))
    deployed: list[dict[str, Any]] = []
    monkeypatch.setattr(runner, "detect_gpus", lambda *a, **k: 0)
    monkeypatch.setattr(runner, "start_ray", lambda *a, **k: True)
    monkeypatch.setattr(runner, "deploy", deployed.append)
    monkeypatch.setattr(runner, "wait_ready", lambda *a, **k: {})
    docs = list(yaml.safe_load_all((Path(__file__).parents[2] / "configs/examples/local-demo.yaml").read_text()))
    with FileServer(FILES) as server:
        for d in docs:
            if d["kind"] == "ArksModel":
                d["spec"] = {"model": "acme/tiny-chat", "source": {"http": {"files": [
                    {"url": f"{server.url}/files/{n}", "path": n} for n in FILES]}},
                    "storage": {"pvc": {"spec": {"resources": {"requests": {"storage": "1Gi"}}}}}}
        manifest = tmp_path / "demo.yaml"
        manifest.write_text(yaml.safe_dump_all(docs))
        result = CliRunner().invoke(app, ["up", "-f", str(manifest), "--detach", "--port", "18123"])
        assert result.exit_code == 0, result.output
        assert "pulled default/tiny-qwen2" in result.output
        (config,) = deployed
        (engine,) = [a for a in config["applications"] if a["name"] != "gateway"]
        path = Path(engine["args"]["llm_config"]["model_loading_config"]["model_source"])
        assert path.parent == tmp_path / "cache" / "models"
        assert_model(path, FILES)
        server.files = {}  # a second `up` needs no server: the copy is complete
        again = CliRunner().invoke(app, ["up", "-f", str(manifest), "--detach", "--port", "18123"])
        assert again.exit_code == 0, again.output
        assert "is already in" in again.output
