"""Dynamo launch specs: the exact command line and environment of the Dynamo frontend and workers.

Pure (no I/O). Called by the Dynamo sidecar deployments (``deployments.dynamo_engine``), which run these
commands as processes next to a Serve replica, and by the renderer (``arks_ray.render.serve_config``),
which checks an app's Dynamo arguments before anything is deployed.

Upstream Dynamo (1.x) serves with two kinds of process:

- ``python -m dynamo.frontend``: the OpenAI HTTP server, router and pre/post-processing;
- ``python -m dynamo.vllm|sglang|trtllm|mocker``: a worker. ``mocker`` simulates an engine on CPU.

They find each other through a discovery backend: a directory (``file``, one machine or one pod) or
etcd (a cluster, chosen when ``ETCD_ENDPOINTS`` is set, as Arks' Dynamo sample sets it). Requests go
over the TCP request plane unless ``DYN_REQUEST_PLANE`` says otherwise.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Engine = Literal["vllm", "sglang", "trtllm", "mocker"]
ENGINES: tuple[str, ...] = ("vllm", "sglang", "trtllm", "mocker")
MODES: tuple[str, ...] = ("agg", "prefill", "decode")


@dataclass(frozen=True)
class EngineFlags:
    """How one Dynamo worker spells the flags the spec owns."""

    model: str
    served_name: str
    tp: str | None
    pp: str | None


# From each worker's ``--help`` in ai-dynamo 1.6.1: vLLM and SGLang keep their own engine flags; Dynamo's
# TRT-LLM worker renamed --model-path to --model; the mocker names the model --model-name.
FLAGS: dict[str, EngineFlags] = {
    "vllm": EngineFlags("--model", "--served-model-name", "--tensor-parallel-size", "--pipeline-parallel-size"),
    "sglang": EngineFlags("--model-path", "--served-model-name", "--tp-size", "--pp-size"),
    "trtllm": EngineFlags("--model", "--served-model-name", "--tensor-parallel-size", "--pipeline-parallel-size"),
    "mocker": EngineFlags("--model-path", "--model-name", None, None),
}
TP_ALIASES = ("--tp", "--tp-size", "--tensor-parallel-size", "-tp")
PP_ALIASES = ("--pp", "--pp-size", "--pipeline-parallel-size", "-pp")
# Dynamo refuses a vLLM prefill worker without an explicit KV connector; NIXL is its documented default.
VLLM_PD_KV_TRANSFER = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'

_WORKER_OWNED = {
    "--model": "the ArksModel", "--model-path": "the ArksModel",
    "--served-model-name": "servedModelName", "--model-name": "servedModelName",
    "--disaggregation-mode": "the prefill/decode role", "--is-prefill-worker": "the prefill/decode role",
    "--is-decode-worker": "the prefill/decode role",
    "--discovery-backend": "arks-ray (file locally, etcd when ETCD_ENDPOINTS is set)",
    "--request-plane": "arks-ray (DYN_REQUEST_PLANE)", "--namespace": "arks-ray (one Dynamo namespace per app)",
    "--endpoint": "arks-ray (one Dynamo namespace per app)",
}
_FRONTEND_OWNED = {
    "--http-port": "the sidecar supervisor", "--http-host": "the sidecar supervisor",
    "--discovery-backend": _WORKER_OWNED["--discovery-backend"], "--request-plane": _WORKER_OWNED["--request-plane"],
    "--namespace": _WORKER_OWNED["--namespace"], "--namespace-prefix": _WORKER_OWNED["--namespace"],
}
_SHELL = re.compile(r"[;&|`<>]|\$\(|\$\{")
_NAMESPACE_CHARS = re.compile(r"[^a-z0-9_-]+")
# Variables of the Serve replica's own Python that must not leak into Dynamo's virtualenv.
_PYTHON_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


class LaunchError(ValueError):
    """Dynamo settings that cannot become a command line; the message names the field to fix."""


@dataclass(frozen=True)
class Cluster:
    """How the sidecars of one app find each other."""

    discovery: str = "file"
    """``file`` (a directory shared by the processes of one machine or pod), ``etcd`` or ``kubernetes``."""

    request_plane: str = "tcp"
    """Transport from the frontend's router to workers: ``tcp`` (Dynamo's default) or ``nats``."""

    namespace: str = "dynamo"
    """Dynamo namespace of the app: frontends only route to workers of their own namespace."""

    file_dir: str | None = None
    """Root of the file discovery store (``DYN_FILE_KV``), when ``discovery`` is ``file``."""


@dataclass(frozen=True)
class LaunchSpec:
    """One sidecar process: its role, exact command line and the environment it adds."""

    role: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def command(self) -> str:
        return shlex.join(self.argv)


def dynamo_namespace(namespace: str, app: str) -> str:
    """The Dynamo namespace of an app: unique per Kubernetes namespace and app, in Dynamo's alphabet."""
    raw = f"arks-{namespace}-{app}".lower()
    return _NAMESPACE_CHARS.sub("-", raw).strip("-")[:100]


def cluster_from_env(env: Mapping[str, str], namespace: str, file_dir: str | None) -> Cluster:
    """Discovery and request plane from the replica's environment (the pod's env in a cluster).

    ``DYN_DISCOVERY_BACKEND`` / ``DYN_REQUEST_PLANE`` set by the user win; otherwise etcd when
    ``ETCD_ENDPOINTS`` is set, else a discovery directory.
    """
    discovery = env.get("DYN_DISCOVERY_BACKEND") or ("etcd" if env.get("ETCD_ENDPOINTS") else "file")
    if discovery not in ("file", "etcd", "kubernetes"):
        raise LaunchError(f"DYN_DISCOVERY_BACKEND={discovery!r}: expected file, etcd or kubernetes")
    plane = env.get("DYN_REQUEST_PLANE") or "tcp"
    if plane not in ("tcp", "nats"):
        raise LaunchError(f"DYN_REQUEST_PLANE={plane!r}: expected tcp or nats")
    if discovery == "file" and not file_dir:
        raise LaunchError("file discovery needs a directory")
    return Cluster(discovery, plane, namespace, file_dir if discovery == "file" else None)


def split_args(args: Sequence[str], field_name: str) -> list[str]:
    """Arks-style argument strings (``["--max-model-len 8192"]``) as shell words, never through a shell."""
    line = " ".join(args)
    if _SHELL.search(line):
        raise LaunchError(f"{field_name}: shell syntax is not supported: {line!r}")
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise LaunchError(f"{field_name}: cannot split {line!r}: {exc}") from None


def _flag_name(word: str) -> str | None:
    if not word.startswith("-") or word in ("-", "--"):
        return None
    return word.partition("=")[0]


def _take(words: list[str], aliases: Sequence[str], field_name: str) -> tuple[list[str], int | None]:
    """Remove every alias of one integer flag from ``words``; return the rest and the value given."""
    rest: list[str] = []
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        name = _flag_name(words[i])
        if name is not None and name in aliases:
            _, eq, inline = words[i].partition("=")
            if eq:
                found.append((name, inline))
                i += 1
            elif i + 1 < len(words):
                found.append((name, words[i + 1]))
                i += 2
            else:
                raise LaunchError(f"{field_name}: {name} needs a value")
            continue
        rest.append(words[i])
        i += 1
    if len(found) > 1:
        raise LaunchError(f"{field_name}: {' and '.join(n for n, _ in found)} set the same thing")
    if not found:
        return rest, None
    name, text = found[0]
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"{field_name}: {name} needs a positive integer, got {text!r}")
    return rest, int(text)


def _refuse_owned(words: Sequence[str], owned: Mapping[str, str], field_name: str) -> None:
    for word in words:
        name = _flag_name(word)
        if name is not None and name in owned:
            raise LaunchError(f"{field_name}: {name} is set by {owned[name]}")


def _cluster_flags(cluster: Cluster) -> list[str]:
    return ["--discovery-backend", cluster.discovery, "--request-plane", cluster.request_plane]


def _cluster_env(cluster: Cluster) -> dict[str, str]:
    env = {"DYN_NAMESPACE": cluster.namespace}
    if cluster.file_dir:
        env["DYN_FILE_KV"] = cluster.file_dir
    return env


def frontend_spec(python: str, port: int, cluster: Cluster, args: Sequence[str] = (),
                  field_name: str = "router.routerArgs") -> LaunchSpec:
    """``python -m dynamo.frontend`` on loopback ``port``: only its own replica talks to it."""
    words = split_args(args, field_name)
    _refuse_owned(words, _FRONTEND_OWNED, field_name)
    argv = [python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
            *_cluster_flags(cluster), *words]
    return LaunchSpec("frontend", tuple(argv), _cluster_env(cluster))


def worker_spec(python: str, engine: str, model_path: str, served_name: str, cluster: Cluster, *,
                mode: str = "agg", args: Sequence[str] = (), field_name: str = "dynamo.args") -> LaunchSpec:
    """``python -m dynamo.<engine>`` serving ``model_path`` as ``served_name`` in one disaggregation role.

    Tensor/pipeline parallelism may be given with any usual spelling (``--tp``, ``--tp-size``,
    ``--tensor-parallel-size``); it is passed in the engine's own spelling.
    """
    if engine not in FLAGS:
        raise LaunchError(f"dynamo.engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if mode not in MODES:
        raise LaunchError(f"disaggregation mode {mode!r} is not one of {', '.join(MODES)}")
    flags = FLAGS[engine]
    words = split_args(args, field_name)
    words, tp = _take(words, TP_ALIASES, field_name)
    words, pp = _take(words, PP_ALIASES, field_name)
    _refuse_owned(words, _WORKER_OWNED, field_name)
    argv = [python, "-m", f"dynamo.{engine}", flags.model, model_path, flags.served_name, served_name]
    for value, flag, what in ((tp, flags.tp, "tensor"), (pp, flags.pp, "pipeline")):
        if value is None:
            continue
        if flag is None:
            if value > 1:
                raise LaunchError(f"{field_name}: the {engine} engine has no {what} parallelism")
            continue
        argv += [flag, str(value)]
    if mode != "agg":
        argv += ["--disaggregation-mode", mode]
        has_kv = any(_flag_name(w) == "--kv-transfer-config" for w in words)
        if engine == "vllm" and not has_kv:
            argv += ["--kv-transfer-config", VLLM_PD_KV_TRANSFER]
    argv += [*_cluster_flags(cluster), *words]
    role = "worker" if mode == "agg" else mode
    return LaunchSpec(role, tuple(argv), _cluster_env(cluster))


def check_worker_args(engine: str, args: Sequence[str], field_name: str, modes: Sequence[str] = ("agg",)) -> None:
    """Raise LaunchError if ``args`` cannot make a worker command line (for the renderer's validation)."""
    cluster = Cluster(file_dir="/")
    for mode in modes:
        worker_spec("python", engine, "model", "name", cluster, mode=mode, args=args, field_name=field_name)


def check_frontend_args(args: Sequence[str], field_name: str) -> None:
    """Raise LaunchError if ``args`` cannot be added to the frontend's command line."""
    frontend_spec("python", 1, Cluster(file_dir="/"), args, field_name)


def sidecar_environ(base: Mapping[str, str], spec: LaunchSpec) -> dict[str, str]:
    """The environment a sidecar starts with: the replica's (GPUs, etcd/NATS addresses, user env), without
    the replica's own Python settings, plus the spec's."""
    env = {k: v for k, v in base.items() if k not in _PYTHON_ENV}
    env.update(spec.env)
    return env
