"""Paths tests read: the repository, its vendored fixtures, and the project's shared/ folder beside it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests/fixtures"
# KubeRay v1.7.0's RayService CRD (Apache-2.0, see NOTICE there), vendored so schema tests need nothing else.
KUBERAY_RAYSERVICE_CRD = FIXTURES / "kuberay-v1.7.0/ray.io_rayservices.yaml"
# shared/ sits beside the clone (CI and developer machines alike).
SHARED = ROOT.parent / "shared"
