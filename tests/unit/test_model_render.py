"""What an ArksModel renders to for each source: the download Job (one command for every source,
credentials only as Secret references), the PVC, and nothing at all for in-place sources."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from arks_ray.api import ArksModel, load_yaml
from arks_ray.models.job import main as job_main
from arks_ray.render.models import render_download_job, render_pvc

K8S = "1.33.0"
PVC = {"pvc": {"spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}}}}


def model(source: dict[str, Any] | None, storage: bool = True, **spec: Any) -> ArksModel:
    body: dict[str, Any] = {"model": "acme/tiny-chat", **spec}
    if source is not None:
        body["source"] = source
    if storage:
        body["storage"] = PVC
    return ArksModel.model_validate({"metadata": {"name": "tiny", "namespace": "ns"}, "spec": body})


S3 = {"s3": {"uri": "s3://models/acme/tiny-chat", "endpoint": "http://minio.storage:9000", "region": "us-east-1",
             "credentialsSecretRef": {"name": "s3-creds"}}}
HTTP = {"http": {"urls": ["https://files.example/tiny-chat/config.json",
                          "https://files.example/tiny-chat/model.safetensors"]}}


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return dict(c)


@pytest.mark.parametrize("source", [S3, HTTP, {"huggingface": {"revision": "v2", "allowPatterns": ["*.json"]}},
                                    {"modelscope": {"tokenSecretRef": {"name": "ms"}}}])
def test_every_download_source_renders_one_valid_job_running_the_shared_downloader(source: dict[str, Any]) -> None:
    m = model(source)
    job = render_download_job(m, "ns", "img:1")
    assert job is not None
    kubernetes_validate.validate(job, K8S, strict=True)
    pvc = render_pvc(m, "ns")
    assert pvc is not None
    kubernetes_validate.validate(pvc, K8S, strict=True)
    cmd = container(job)["command"]
    assert cmd[:3] == ["python", "-m", "arks_ray.models"]
    # The command's --source is the spec's source, and the downloader parses it back.
    assert json.loads(cmd[cmd.index("--source") + 1]) == m.spec.source.model_dump(  # type: ignore[union-attr]
        by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")
    assert cmd[cmd.index("--dest") + 1] == "/models/models/ns/tiny"


def test_s3_credentials_come_from_the_secret_by_reference_only() -> None:
    env = container(render_download_job(model(S3), "ns", "img") or {})["env"]
    assert [(e["name"], e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"].get("optional"))
            for e in env] == [("AWS_ACCESS_KEY_ID", "s3-creds", None), ("AWS_SECRET_ACCESS_KEY", "s3-creds", None),
                              ("AWS_SESSION_TOKEN", "s3-creds", True)]
    assert all("value" not in e for e in env)


def test_an_arks_huggingface_model_keeps_its_meaning() -> None:
    m = model({"huggingface": {"tokenSecretRef": {"name": "hf-token"}}})
    c = container(render_download_job(m, "ns", "img") or {})
    assert c["env"] == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}]
    assert c["command"][c["command"].index("--model-id") + 1] == "acme/tiny-chat"


def test_an_http_source_needs_no_secret() -> None:
    assert "env" not in container(render_download_job(model(HTTP), "ns", "img") or {})


def test_a_pvc_source_is_used_in_place() -> None:
    m = model({"pvc": {"claimName": "shared-weights", "subPath": "acme/tiny-chat"}}, storage=False)
    assert render_pvc(m, "ns") is None
    assert render_download_job(m, "ns", "img") is None
    assert m.pvc_name() == "shared-weights"
    assert m.model_path("ns") == "/models/acme/tiny-chat"


def test_the_issue_shapes_load_from_yaml() -> None:
    text = """
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {name: tiny-s3}
spec:
  model: acme/tiny-chat
  source:
    s3:
      uri: s3://models/acme/tiny-chat
      endpoint: http://minio.storage:9000
      region: us-east-1
      credentialsSecretRef: {name: s3-creds}
  storage: {pvc: {spec: {resources: {requests: {storage: 1Gi}}}}}
---
apiVersion: arks.ai/v1
kind: ArksModel
metadata: {name: tiny-http}
spec:
  model: acme/tiny-chat
  source:
    http:
      urls: [https://files.example/tiny-chat/config.json, https://files.example/tiny-chat/model.safetensors]
  storage: {pvc: {spec: {resources: {requests: {storage: 1Gi}}}}}
"""
    loaded = load_yaml(text, "default")
    assert not loaded.problems
    assert [o.spec.source.kind for o in loaded.objects if isinstance(o, ArksModel) and o.spec.source] == ["s3", "http"]


@pytest.mark.parametrize(("source", "message"), [
    ({"s3": {"uri": "http://x"}}, "uri"),
    ({"s3": {"uri": "s3://b"}, "http": {"urls": ["http://x/a"]}}, "at most one"),
    ({"http": {}}, "set urls or files"),
    ({"http": {"urls": ["ftp://x/a"]}}, "not an http"),
    ({"http": {"files": [{"url": "http://x/a", "sha256": "abc"}]}}, "sha256"),
])
def test_bad_sources_say_why(source: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model(source)


def test_the_job_refuses_a_malformed_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert job_main(["--model-id", "x", "--source", '{"s3": {"uri": "nope"}}', "--dest", "/nonexistent/x"]) == 1
    assert capsys.readouterr().err.startswith("arks-ray: download failed:")


def _quickstart_with_loader(loader: dict[str, Any], args: list[str] | None = None) -> Any:
    from pathlib import Path

    import yaml

    from arks_ray.api import load_documents
    from arks_ray.render import render

    docs = list(yaml.safe_load_all((Path(__file__).parents[1] / "fixtures/arks/quickstart.yaml").read_text()))
    for doc in docs:
        if doc["kind"] == "ArksModel":
            doc["spec"]["loader"] = loader
        if doc["kind"] == "ArksApplication" and args is not None:
            doc["spec"]["runtimeCommonArgs"] = args
    (result,) = render(load_documents(docs))
    return result


def _llm_config(result: Any) -> dict[str, Any]:
    (app,) = [a for a in result.serve_config["applications"] if a["name"] != "gateway"]
    return dict(app["args"]["llm_config"])


def test_the_loader_reaches_vllm_through_engine_kwargs() -> None:
    result = _quickstart_with_loader({"format": "runai_streamer", "concurrency": 16, "memoryLimitBytes": 1 << 30})
    kwargs = _llm_config(result)["engine_kwargs"]
    assert kwargs["load_format"] == "runai_streamer"
    assert kwargs["model_loader_extra_config"] == {"concurrency": 16, "memory_limit": 1 << 30}
    fast = _llm_config(_quickstart_with_loader({"format": "fastsafetensors"}))["engine_kwargs"]
    assert fast["load_format"] == "fastsafetensors"
    assert "model_loader_extra_config" not in fast
    assert "load_format" not in _llm_config(_quickstart_with_loader({"format": "auto"}))["engine_kwargs"]


def test_the_loader_and_a_load_format_flag_conflict() -> None:
    result = _quickstart_with_loader({"format": "fastsafetensors"}, ["--load-format", "safetensors"])
    assert any("load-format" in p.message for p in result.problems)


def test_streamer_settings_need_the_streamer() -> None:
    with pytest.raises(ValueError, match="runai_streamer only"):
        model(HTTP, loader={"format": "fastsafetensors", "concurrency": 4})
