"""Snapshots of ``arks-ray render`` for the quickstart and every example in configs/examples.

One YAML file per input under ``__snapshots__/test_render_snapshots/``, so a review reads the rendered
manifests (and, separately, the Serve config that the RayService embeds as a string) as YAML. Update
them on purpose with ``pytest tests/unit/test_render_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode
from typer.testing import CliRunner

from arks_ray.cli import app

ROOT = Path(__file__).resolve().parents[2]
# configs/examples/quickstart.yaml is the Arks quickstart verbatim (test_render_arks_compat checks that).
INPUTS = sorted(p for p in (ROOT / "configs" / "examples").glob("*.yaml") if p.name != "local-demo.yaml")


class YamlSnapshot(SingleFileSnapshotExtension):
    _write_mode = WriteMode.TEXT
    file_extension = "yaml"


@pytest.fixture
def yaml_snapshot(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    return snapshot.use_extension(YamlSnapshot)


def _id(path: Path) -> str:
    return path.stem


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("path", INPUTS, ids=_id)
def test_rendered_manifests(path: Path, yaml_snapshot: SnapshotAssertion) -> None:
    out = run("render", "-f", str(path))
    assert next(d["kind"] for d in yaml.safe_load_all(out)) == "RayService"
    assert out == yaml_snapshot


@pytest.mark.parametrize("path", INPUTS, ids=_id)
def test_rendered_serve_config(path: Path, yaml_snapshot: SnapshotAssertion) -> None:
    out = run("render", "--serve-config", "-f", str(path))
    assert out == yaml_snapshot
