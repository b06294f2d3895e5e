"""The ``arks-ray`` command line: render, validate and crds, driven through Typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from arks_ray.api.crds import all_crds
from arks_ray.api.loading import load_yaml
from arks_ray.cli import app, crd_text
from arks_ray.render import render

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "tests" / "fixtures" / "arks" / "quickstart.yaml"
SAMPLES = ROOT / "tests" / "fixtures" / "arks" / "samples"


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=stdin)


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """The quickstart with three mistakes in two objects."""
    docs = list(yaml.safe_load_all(QUICKSTART.read_text()))
    docs[1]["spec"]["replicas"] = -1
    docs[1]["spec"]["runtime"] = "trtllm"
    docs[4]["spec"]["qos"][0]["rateLimits"][0]["type"] = "rps"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


# --- render ---------------------------------------------------------------------------------------------


def test_render_prints_the_rayservice_first() -> None:
    result = run("render", "-f", str(QUICKSTART))
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("RayService", "arks"), ("NetworkPolicy", "arks-ray-cluster"), ("PersistentVolumeClaim", "qwen-7b"),
        ("Job", "arks-model-qwen-7b")]
    assert result.stderr == ""
    assert "sk-test123456" not in result.output


def test_render_serve_config_prints_only_the_serve_config() -> None:
    result = run("render", "--serve-config", "-f", str(QUICKSTART))
    assert result.exit_code == 0, result.output
    (config,) = list(yaml.safe_load_all(result.stdout))
    assert set(config) == {"proxy_location", "http_options", "applications"}
    assert [a["name"] for a in config["applications"]] == ["gateway", "app-qwen"]
    full = next(yaml.safe_load_all(run("render", "-f", str(QUICKSTART)).stdout))
    assert yaml.safe_load(full["spec"]["serveConfigV2"]) == config


def test_render_reads_several_files_and_stdin() -> None:
    app_sample = SAMPLES / "arks_v1_arksapplication_sglang.yaml"
    result = run("render", "-f", str(SAMPLES / "arks_v1_arksmodel.yaml"), "-f", "-", stdin=app_sample.read_text())
    assert result.exit_code == 0, result.output
    assert next(yaml.safe_load_all(result.stdout))["kind"] == "RayService"
    # Warnings go to stderr, one line each, and do not fail the command.
    assert "warning: ArksApplication/app-qwen: spec.extraOptions:" in result.stderr


def test_render_refuses_errors_and_prints_nothing_on_stdout(broken: Path) -> None:
    result = run("render", "-f", str(broken))
    assert result.exit_code == 1
    assert result.stdout == ""
    no_traceback(result)


def test_render_serve_config_needs_one_namespace(tmp_path: Path) -> None:
    docs = [dict(d, metadata={**d["metadata"], "namespace": "default"}) for d in yaml.safe_load_all(
        QUICKSTART.read_text())]
    other = [dict(d, metadata={**d["metadata"], "namespace": "other"}) for d in docs]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all(docs + other))
    result = run("render", "--serve-config", "-f", str(path))
    assert result.exit_code == 2
    assert "-n NAMESPACE" in result.stderr
    picked = run("render", "--serve-config", "-n", "other", "-f", str(path))
    assert picked.exit_code == 0, picked.output
    assert yaml.safe_load(picked.stdout)["applications"][0]["deployments"][0]["user_config"]["namespace"] == "other"
    assert "not other; skipped" in picked.stderr


def test_render_of_a_file_without_arks_objects(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("---\n")
    result = run("render", "-f", str(path))
    assert result.exit_code == 1
    assert "no Arks objects found" in result.stderr


# --- validate --------------------------------------------------------------------------------------------


def test_validate_good_input() -> None:
    result = run("validate", "-f", str(QUICKSTART))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "ok: 5 object(s) in 1 namespace(s)"
    assert result.stderr == ""


def test_validate_bad_input_prints_one_line_per_problem(broken: Path) -> None:
    result = run("validate", "-f", str(broken))
    assert result.exit_code == 1
    no_traceback(result)
    lines = result.stderr.splitlines()
    assert lines[-1] == "3 error(s)"
    problems = lines[:-1]
    loaded = load_yaml(broken.read_text())
    expected = loaded.problems + [p for r in render(loaded) for p in r.problems]
    assert problems == [str(p) for p in expected]
    assert all(line.startswith(("error: ", "warning: ")) for line in problems)
    errors = [line for line in problems if line.startswith("error: ")]
    assert len(errors) == 3
    for needle in ("ArksApplication/app-qwen: spec.replicas: ", "ArksApplication/app-qwen: spec.runtime: ",
                   "ArksToken/example-token: spec.qos[0].rateLimits[0].type: "):
        assert sum(needle in line for line in errors) == 1, (needle, errors)


def test_validate_warnings_alone_pass() -> None:
    result = run("validate", "-f", str(SAMPLES / "arks_v1_arksapplication_sglang.yaml"),
                 "-f", str(SAMPLES / "arks_v1_arksmodel.yaml"))
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0].startswith("warning: ArksApplication/app-qwen: spec.extraOptions:")
    assert result.stdout.startswith("ok: 2 object(s)")


def test_validate_reports_cross_object_problems() -> None:
    # The app's model is in another file that was not passed: found by render, reported by validate.
    result = run("validate", "-f", str(SAMPLES / "arks_v1_arksapplication_vllm.yaml"))
    assert result.exit_code == 1
    assert "error: ArksApplication/app-qwen-vllm: spec.model.name: ArksModel 'qwen-7b' not found" in result.stderr


@pytest.mark.parametrize("command", ["render", "validate"])
def test_missing_file(command: str, tmp_path: Path) -> None:
    result = run(command, "-f", str(tmp_path / "nope.yaml"))
    assert result.exit_code != 0
    no_traceback(result)
    assert "nope.yaml" in result.stderr
    assert "cannot read" in result.stderr


@pytest.mark.parametrize("command", ["render", "validate"])
def test_unparseable_yaml(command: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: ArksModel\nmetadata: {name: [unclosed\n")
    result = run(command, "-f", str(path))
    assert result.exit_code == 1
    no_traceback(result)
    assert "cannot parse" in result.stderr


def test_filename_is_required() -> None:
    result = run("validate")
    assert result.exit_code != 0
    no_traceback(result)


# --- crds --------------------------------------------------------------------------------------------------


def test_crds_prints_six_crds() -> None:
    result = run("crds")
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["CustomResourceDefinition"] * 6
    assert {d["spec"]["names"]["kind"] for d in docs} == {
        "ArksApplication", "ArksDisaggregatedApplication", "ArksModel", "ArksEndpoint", "ArksToken", "ArksQuota"}
    assert docs == list(all_crds().values())


def test_crds_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("crds", "--write")
    assert result.exit_code == 0, result.output
    for directory in ("configs/crds", "charts/arks-ray/crds"):
        written = {p.name: p.read_text() for p in (tmp_path / directory).glob("*.yaml")}
        assert written == {name: crd_text(doc) for name, doc in all_crds().items()}
        assert written == {p.name: p.read_text() for p in (ROOT / directory).glob("*.yaml")}
