"""Models on a workstation: ``arks-ray model pull`` and the pulls ``arks-ray up`` makes before serving.

Called by ``arks_ray.cli``. Every ArksModel with a download source is pulled with the Job's own code
(``arks_ray.models.job.pull_source``) into ``${ARKS_RAY_CACHE:-~/.cache/arks-ray}/models`` (or
``--cache-dir``), one directory per source: two ArksModels with the same source share one copy.
Credentials come from the Secret the source names, read from the same files, as the operator reads it
from the cluster; without such a Secret in the files, from the environment variables of the same names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from arks_ray.api.loading import Secret
from arks_ray.api.model import ArksModel
from arks_ray.models.files import DownloadError, source_digest
from arks_ray.models.job import credentials, pull_source
from arks_ray.models.progress import TerminalSink, describe
from arks_ray.models.sources import CREDENTIAL_KEYS, secret_name


def default_cache_dir() -> Path:
    return Path(os.environ.get("ARKS_RAY_CACHE") or "~/.cache/arks-ray").expanduser() / "models"


def cache_path(model: ArksModel, cache_dir: Path) -> Path:
    """``<cache>/<model id, made a file name>-<source digest>``: stable, and shared by equal sources."""
    assert model.spec.source is not None
    digest = source_digest(model.spec.source.model_dump(by_alias=True, exclude_none=True, mode="json"),
                           model.spec.model)
    return cache_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '--', model.spec.model).strip('-')}-{digest[:12]}"


def model_credentials(model: ArksModel, secrets: Sequence[Secret], env: Mapping[str, str]) -> dict[str, str]:
    """The source's credentials: its Secret from the files, else the environment."""
    source = model.spec.source
    assert source is not None
    name = secret_name(source)
    namespace = model.metadata.namespace or "default"
    found = next((s for s in secrets if s.name == name and s.namespace == namespace), None) if name else None
    if found is None:
        return credentials(source, env)
    keys = CREDENTIAL_KEYS.get(source.kind or "", ())
    if not any(found.data.get(k) for k in keys):
        raise DownloadError(f"Secret {namespace}/{name} has none of the keys {', '.join(keys)}")
    return {**credentials(source, env), **{k: found.data[k] for k in keys if found.data.get(k)}}


@dataclass(frozen=True)
class Pulled:
    model: ArksModel
    path: Path
    note: str


def pull_models(models: Sequence[ArksModel], secrets: Sequence[Secret], cache_dir: Path, out: TextIO,
                env: Mapping[str, str] | None = None) -> list[Pulled]:
    """Pull every downloadable model that is not complete in the cache; raises DownloadError naming it."""
    env = os.environ if env is None else env
    done = []
    for model in models:
        if not model.spec.downloads or model.spec.source is None:
            continue
        name = f"{model.metadata.namespace or 'default'}/{model.metadata.name}"
        dest = cache_path(model, cache_dir)
        try:
            creds = model_credentials(model, secrets, env)
            result = pull_source(model.spec.model, model.spec.source, dest, creds, TerminalSink(out, label=name))
        except DownloadError as exc:
            raise DownloadError(f"ArksModel {name}: {exc}") from None
        note = (f"pulled {name} into {dest}: {describe(result.progress)}" if result.downloaded and result.progress
                else f"{name} is already in {dest}")
        done.append(Pulled(model, dest, note))
    return done


def point_at_cache(node: object, pulled: Sequence[Pulled]) -> int:
    """Make the local Serve config load pulled models from the cache: every ``model_source`` (and
    SGLang's ``model_path``) naming a pulled model's id becomes its cache path. Returns how many."""
    paths = {p.model.spec.model: str(p.path) for p in pulled}
    count = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("model_source", "model_path") and isinstance(value, str) and value in paths:
                node[key] = paths[value]
                count += 1
            else:
                count += point_at_cache(value, pulled)
    elif isinstance(node, list):
        count += sum(point_at_cache(v, pulled) for v in node)
    return count
