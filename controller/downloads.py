"""An ArksModel's children (PVC and download Job) and its status. Pure.

Called by ``controller.plans`` for every ArksModel of a namespace, with the PVC and the Jobs observed.

- The PVC is create-only (``arks.ai/create-only``): created if absent, never patched. A PVC that
  already exists (shared weights, made by hand) is used as it is, without an owner reference.
- A Job's pod template is immutable, so a Job is created once per attempt. Each attempt carries a hash
  of what it downloads and its number in annotations; a changed source or a failed attempt gets a new
  Job (the attempt number in its name), and the superseded one is deleted.
- A failed attempt is retried after ``min(lo * 2**retries, hi)`` seconds, counted from its failure,
  instead of leaving the model in a terminal Failed (Arks' bug): phase Failed means "retrying".

Phases: Pending -> StorageCreating -> ModelLoading -> Ready, and Failed while waiting to retry.

While a Job runs, its last progress report (``arks_ray.models.progress``, read from its log by
``controller.progress``) becomes ``status.progress`` (one line, a printer column) and
``status.download`` (the numbers), and the model is looked at again every ``PROGRESS_EVERY_S``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from arks_ray.api.model import ArksModel
from arks_ray.errors import Problem
from arks_ray.models.progress import Snapshot, parse_report
from arks_ray.models.progress import describe as describe_progress
from arks_ray.render.names import digest, dns_label
from controller.meta import annotation, is_deleting, meta, name_of, owner_ref, parse_time, timestamp
from controller.status import Cond, ModelState, Status, conditions, describe, errors_in
from controller.writes import Write

HASH = "arks.ai/spec-hash"
ATTEMPT = "arks.ai/attempt"
RETRIES = "arks.ai/retries"
PROGRESS_EVERY_S = 15.0


@dataclass
class ModelPlan:
    """What one model needs written, and what it looks like."""

    state: ModelState
    status: Status
    writes: list[Write] = field(default_factory=list)
    requeue_after: float | None = None


@dataclass(frozen=True)
class ModelInputs:
    """Everything observed and rendered for one ArksModel."""

    raw: Mapping[str, Any]
    model: ArksModel | None
    """None when the object failed validation."""
    problems: Sequence[Problem]
    pvc: Mapping[str, Any] | None
    """The rendered PVC (None: the model needs none)."""
    live_pvc: Mapping[str, Any] | None
    job: Mapping[str, Any] | None
    """The rendered download Job (None: nothing to download)."""
    live_jobs: Sequence[Mapping[str, Any]]
    logs: Mapping[str, str] = field(default_factory=dict)
    """Log tails of running download Jobs, by Job name."""


def download_hash(job: Mapping[str, Any]) -> str:
    """What a download Job fetches, and where: its command, env and volumes. The image and resources are
    left out, so upgrading the operator (and its downloader image) does not download every model again."""
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    return digest({"command": container.get("command"), "env": container.get("env"),
                   "volumes": pod.get("volumes")}, 16)


def _attempt(job: Mapping[str, Any]) -> int:
    value = annotation(job, ATTEMPT)
    return int(value) if value and value.isdigit() else 1


def _job_condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def job_succeeded(job: Mapping[str, Any]) -> bool:
    return bool(_job_condition(job, "Complete")) or int((job.get("status") or {}).get("succeeded") or 0) > 0


def job_failure(job: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The Failed condition of a finished, failed Job (None while it runs or after it succeeded)."""
    return None if job_succeeded(job) else _job_condition(job, "Failed")


def _new_job(rendered: Mapping[str, Any], model_raw: Mapping[str, Any], attempt: int, retries: int,
             spec_hash: str) -> dict[str, Any]:
    job = copy.deepcopy(dict(rendered))
    job_meta = job["metadata"]
    if attempt > 1:
        job_meta["name"] = dns_label(job_meta["name"], f"attempt-{attempt}")
    job_meta["annotations"] = {**job_meta.get("annotations", {}), HASH: spec_hash, ATTEMPT: str(attempt),
                               RETRIES: str(retries)}
    ref = owner_ref(model_raw, controller=True)
    if ref:
        job_meta["ownerReferences"] = [ref]
    return job


def _storage(inputs: ModelInputs, ns: str) -> tuple[list[Write], Cond, str | None]:
    """PVC writes, the StorageCreated condition, and the phase storage imposes (None: storage is fine)."""
    if inputs.pvc is None:
        return [], Cond("StorageCreated", True, "NoStorage", "the model uses a local path"), None
    pvc_name = name_of(inputs.pvc)
    if inputs.live_pvc is None:
        pvc = copy.deepcopy(dict(inputs.pvc))
        ref = owner_ref(inputs.raw, controller=True)
        if ref:
            pvc["metadata"]["ownerReferences"] = [ref]
        write = Write("create", "PersistentVolumeClaim", ns, pvc_name, pvc, "create-only model storage")
        return [write], Cond("StorageCreated", False, "Creating", f"PVC {pvc_name} is being created"), \
            "StorageCreating"
    phase = str((inputs.live_pvc.get("status") or {}).get("phase") or "Pending")
    if phase == "Lost":
        return [], Cond("StorageCreated", False, "StorageLost", f"PVC {pvc_name} lost its volume"), "Failed"
    # Pending is fine: with WaitForFirstConsumer the claim binds only when the download pod mounts it.
    return [], Cond("StorageCreated", True, "Created", f"PVC {pvc_name} is {phase}"), None


def progress_status(snap: Snapshot) -> dict[str, Any]:
    """``status.progress`` and ``status.download`` from one progress report."""
    numbers = {"bytesDone": snap.bytes_done, "bytesTotal": snap.bytes_total, "filesDone": snap.files_done,
               "filesTotal": snap.files_total,
               "rateBytesPerSecond": round(snap.rate_bytes_per_second, 1) if snap.rate_bytes_per_second else None,
               "etaSeconds": round(snap.eta_seconds) if snap.eta_seconds is not None else None}
    return {"progress": describe_progress(snap), "download": {k: v for k, v in numbers.items() if v is not None}}


def _download(inputs: ModelInputs, ns: str, now: float, backoff: tuple[float, float]
              ) -> tuple[list[Write], Cond, str, float | None]:
    """Job writes, the ModelLoaded condition, the phase, and when to look again."""
    jobs = sorted((j for j in inputs.live_jobs if not is_deleting(j)), key=_attempt)
    if inputs.job is None:
        gone = [Write("delete", "Job", ns, name_of(j), why="no download any more") for j in jobs]
        path = inputs.model.model_path(ns) if inputs.model else ""
        return gone, Cond("ModelLoaded", True, "InStorage", f"weights are expected at {path}"), "Ready", None
    want = download_hash(inputs.job)
    current = jobs[-1] if jobs else None
    writes = [Write("delete", "Job", ns, name_of(j), why="superseded attempt") for j in jobs[:-1]]
    if current is None:
        job = _new_job(inputs.job, inputs.raw, 1, 0, want)
        writes.append(Write("create", "Job", ns, name_of(job), job, "download weights"))
        return writes, Cond("ModelLoaded", False, "ModelLoading", "download Job created"), "ModelLoading", None
    attempt = _attempt(current)
    if annotation(current, HASH) != want:
        job = _new_job(inputs.job, inputs.raw, attempt + 1, 0, want)
        writes += [Write("create", "Job", ns, name_of(job), job, "model spec changed"),
                   Write("delete", "Job", ns, name_of(current), why="model spec changed")]
        return writes, Cond("ModelLoaded", False, "ModelLoading", "model changed; downloading again"), \
            "ModelLoading", None
    if job_succeeded(current):
        return writes, Cond("ModelLoaded", True, "ModelLoadSucceeded", "weights downloaded"), "Ready", None
    failure = job_failure(current)
    if failure is None:
        return writes, Cond("ModelLoaded", False, "ModelLoading", f"Job {name_of(current)} is downloading"), \
            "ModelLoading", PROGRESS_EVERY_S
    retries = int(annotation(current, RETRIES) or 0)
    delay = min(backoff[0] * 2 ** retries, backoff[1])
    due = (parse_time(failure.get("lastTransitionTime")) or now) + delay
    why = str(failure.get("message") or failure.get("reason") or "the download Job failed")
    if now >= due:
        job = _new_job(inputs.job, inputs.raw, attempt + 1, retries + 1, want)
        writes += [Write("create", "Job", ns, name_of(job), job, f"retry {retries + 1} after failure"),
                   Write("delete", "Job", ns, name_of(current), why="failed attempt replaced")]
        return writes, Cond("ModelLoaded", False, "ModelLoading", f"retrying after failure: {why}"), \
            "ModelLoading", None
    # An absolute time: a countdown would change the status (and cost a write) at every reconcile.
    message = f"download failed (attempt {attempt}): {why}; retrying at {timestamp(due)}"
    return writes, Cond("ModelLoaded", False, "ModelLoadFailed", message), "Failed", due - now


def plan_model(inputs: ModelInputs, ns: str, now: float, backoff: tuple[float, float]) -> ModelPlan:
    """Writes and status of one ArksModel."""
    raw_status = inputs.raw.get("status")
    previous: Mapping[str, Any] = raw_status if isinstance(raw_status, Mapping) else {}
    generation = meta(inputs.raw).get("generation")
    errors = errors_in(inputs.problems)
    if errors or inputs.model is None:
        why = describe(errors) or "invalid"
        conds = [Cond("StorageCreated", None, "InvalidSpec", ""), Cond("ModelLoaded", None, "InvalidSpec", ""),
                 Cond("Ready", False, "InvalidSpec", why)]
        failed: Status = {"phase": "Failed",
                          "conditions": conditions(conds, previous.get("conditions"), now, generation)}
        return ModelPlan(ModelState("Failed", False, "InvalidSpec", why), failed)
    writes, storage, held = _storage(inputs, ns)
    requeue = None
    if held == "Failed":
        loaded = Cond("ModelLoaded", False, "WaitingForStorage", "")
        phase = "Failed"
    else:
        # The Job is created together with a new PVC: its pod simply waits for the claim.
        more, loaded, phase, requeue = _download(inputs, ns, now, backoff)
        writes += more
        phase = held or phase
    ready = phase == "Ready"
    blocker = storage if held else loaded
    conds = [storage, loaded, Cond("Ready", ready, "Ready" if ready else blocker.reason,
                                   "the model is ready" if ready else blocker.message)]
    state = ModelState(phase, ready, blocker.reason, blocker.message)
    status: Status = {"phase": phase, "conditions": conditions(conds, previous.get("conditions"), now, generation)}
    if generation is not None:
        status["observedGeneration"] = generation
    report = _running_report(inputs) if phase == "ModelLoading" else None
    # None (a merge patch's delete) once there is no report: a Ready model shows no stale progress.
    status.update(progress_status(report) if report is not None else {"progress": None, "download": None})
    return ModelPlan(state, status, writes, requeue)


def _running_report(inputs: ModelInputs) -> Snapshot | None:
    jobs = sorted((j for j in inputs.live_jobs if not is_deleting(j)), key=_attempt)
    if not jobs:
        return None
    return parse_report(inputs.logs.get(name_of(jobs[-1]), ""))
