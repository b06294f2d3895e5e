"""Timestamp probes on a request's way into Ray Serve, for ``benchmarks/serve_intake`` (measurement only).

Python imports this module at start-up in every process whose ``PYTHONPATH`` holds this folder: ``run.sh``
sets it for the benchmark's driver, and every Ray worker inherits it from there. It does nothing unless
``INTAKE_TRACE_DIR`` is set. When that is set, it installs an import hook. The hook patches the modules below as
they are imported. Each process then appends ``<request id>\\t<step>\\t<unix time>[\\t<value>]`` lines to
``$INTAKE_TRACE_DIR/<pid>.tsv``. The file's first line is ``#\\t<process command line>``, which ``analyze.py``
uses to tell the client, proxy, gateway and engine apart. The request id is the client's ``x-request-id``,
which Serve adopts as its own request id.

The probes wrap private code of Ray 2.60 (``ray.serve._private``) and of grpc, uvicorn and httpcore. A Ray
upgrade may rename what they wrap, so expect to revisit them after one. A probe that cannot attach is skipped,
with a line on stderr (``[serve_intake] skipped ...``), and the rest still attach. A probe that fails while a
request is running is noted once and never fails the request. The probes add a few microseconds per step,
plus a pickle load per gRPC call on the proxy. Compare an untraced run (``NOTRACE=1 run.sh``) before
quoting absolute figures.

Steps, in a request's order (the gateway's own calls to the engine stamp the same P/R steps, in its role):

client (the benchmark's httpx2 client)
  C0_httpx_send              ``AsyncClient.send`` called
  C1_conn_ready              a connection is ready, request headers about to be written
  C2_headers_written         headers written to the socket
  C3_body_written            body written
proxy (Serve's ProxyActor)
  P0_uvicorn_headers         uvicorn parsed the request headers
  P0b_uvicorn_body           uvicorn parsed the whole request
  P1_proxy_asgi_call         Serve's ``HTTPProxy`` ASGI app called
  P2_router_task_start       the router's ``assign_request`` started
  P3_replica_chosen          the request router picked a replica
  P4a_grpc_send              the replica wrapper starts the gRPC call
  P4b_grpc_call_created      ... and has the call object back
  P4c_inner_call_created     grpc.aio's ``UnaryStreamCall`` built
  P4d_grpc_send_task_start   its task that sends the request started (the request leaves the proxy)
  P4e_grpc_send_done         that send finished (the server has taken the request)
  P5_initial_metadata        the replica's accept/reject answer arrived
  P5b_router_assigned        ``assign_request`` returned
  P6_first_item              first streamed item from the replica
  P7_proxy_receive_asgi_called  the replica first asked the proxy for the request body
gateway (the ArksGateway replica; the engine replica stamps the same R steps)
  G1_grpc_rpc_accepted       grpc's server matched an ``ASGIService`` call to its handler (no request id:
                             rid ``-``, value = the process's running count)
  R0_grpc_servicer_start     Serve's gRPC servicer ``HandleRequestWithRejectionStreaming`` started
  R1a_unpack_start / R1b_unpack_end  the proxy's pickled ASGI arguments unpacked
  R1_accepted                the replica accepted the request (first item of its rejection protocol)
  R3_http_entrypoint_call    Serve's wrapper is about to call the ASGI app
  R4_auth_middleware         our ``AuthMiddleware`` was called (the request has reached arks-ray code)
  R5_first_body_msg          the app received the first body message
  R9_first_response_item     the servicer yielded its first item
  LAG_ms                     only with ``INTAKE_LAG_PROBE=1``: how late a 5 ms timer on the replica's event
                             loop fired (rid ``-``, value = lateness in ms; ``INTAKE_LAG_PERIOD_S`` sets the period)
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import inspect
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

TRACE_DIR_ENV = "INTAKE_TRACE_DIR"
NOTE = "[serve_intake]"


class Stamp(NamedTuple):
    """One step to record: its name, how to get the request id from the wrapped call's arguments (self first),
    and whether to keep only the first occurrence per request."""

    step: str
    rid_of: Callable[..., str | None]
    once: bool = False


class _Writer:
    """This process's TSV, opened on the first record (so processes that see no request write no file)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.file: Any = None
        self.seen: set[tuple[str, str]] = set()
        self.failed: set[str] = set()

    def write(self, rid: str, step: str, t: float, value: str | None = None) -> None:
        if self.file is None:
            os.makedirs(self.directory, exist_ok=True)
            self.file = open(f"{self.directory}/{os.getpid()}.tsv", "a", buffering=1)  # noqa: SIM115 - open while the process lives
            with open("/proc/self/cmdline", "rb") as cmdline:
                # Read now, not at start-up: Ray renames its workers (ray::ProxyActor, ray::ServeReplica:...).
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            self.file.write(f"#\t{command[:160]}\n")
        self.file.write(f"{rid}\t{step}\t{t:.6f}" + (f"\t{value}\n" if value is not None else "\n"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_writer: _Writer | None = None


def _stamp(stamp: Stamp, *args: Any, **kwargs: Any) -> None:
    t = time.time()  # before the request id, which may take a pickle load
    try:
        rid = stamp.rid_of(*args, **kwargs)
        if rid is None or _writer is None:
            return
        if stamp.once:
            if (rid, stamp.step) in _writer.seen:
                return
            _writer.seen.add((rid, stamp.step))
        _writer.write(rid, stamp.step, t)
    except Exception as e:
        _note_failure(stamp.step, e)


def _note_failure(step: str, error: Exception) -> None:
    if _writer is not None and step not in _writer.failed:
        _writer.failed.add(step)
        sys.stderr.write(f"{NOTE} probe {step} failed in pid {os.getpid()}: {error!r}\n")


# --------------------------------------------------------------------------- request ids from the wrapped calls


def header(headers: Iterable[tuple[Any, Any]], name: bytes = b"x-request-id") -> str | None:
    """The value of an ASGI/uvicorn/httpcore header list's ``name`` header."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def _rid_of_grpc_call(call: Any) -> str | None:
    """A Serve gRPC call carries its request metadata pickled; other gRPC calls (none here) have no id."""
    rid = getattr(call, "_serve_intake_rid", None)
    if rid is None:
        pickled = getattr(getattr(call, "_request", None), "pickled_request_metadata", None)
        if pickled is None:
            return None
        rid = pickle.loads(pickled).request_id
        call._serve_intake_rid = rid
    return rid


def _serve_context_rid(*_: Any, **__: Any) -> str | None:
    import ray.serve.context as serve_context

    return serve_context._get_serve_request_context().request_id


# --------------------------------------------------------------------------- wrappers


def around(before: Stamp | None = None, after: Stamp | None = None) -> Callable[[Any], Any]:
    """A wrapper factory that stamps before and/or after a sync or async function, which it calls unchanged."""

    def make(original: Any) -> Any:
        if not inspect.iscoroutinefunction(original):

            def probed(*args: Any, **kwargs: Any) -> Any:
                if before:
                    _stamp(before, *args, **kwargs)
                result = original(*args, **kwargs)
                if after:
                    _stamp(after, *args, **kwargs)
                return result

            return probed

        async def probed_async(*args: Any, **kwargs: Any) -> Any:
            if before:
                _stamp(before, *args, **kwargs)
            result = await original(*args, **kwargs)
            if after:
                _stamp(after, *args, **kwargs)
            return result

        return probed_async

    return make


def streaming(start: Stamp | None = None, first_item: Stamp | None = None, lag_probe: bool = False) -> Any:
    """A wrapper factory for an async generator: stamps when it starts and when it yields its first item."""

    def make(original: Any) -> Any:
        async def probed(*args: Any, **kwargs: Any) -> Any:
            if start:
                _stamp(start, *args, **kwargs)
            if lag_probe and os.environ.get("INTAKE_LAG_PROBE"):
                _start_lag_probe()
            first = True
            async for item in original(*args, **kwargs):
                if first and first_item:
                    _stamp(first_item, *args, **kwargs)
                first = False
                yield item

        return probed

    return make


def _count_accepts(original: Any) -> Any:
    accepted = 0

    def service(self: Any, handler_call_details: Any) -> Any:
        nonlocal accepted
        if _writer is not None and "ASGIService" in getattr(handler_call_details, "method", ""):
            accepted += 1
            _writer.write("-", "G1_grpc_rpc_accepted", time.time(), str(accepted))
        return original(self, handler_call_details)

    return service


_lag_probe_started = False


def _start_lag_probe() -> None:
    """Stamps how late a periodic timer fires on this event loop: the loop's busy time between steps."""
    import asyncio

    global _lag_probe_started
    if _lag_probe_started:
        return
    _lag_probe_started = True
    loop = asyncio.get_running_loop()
    period = float(os.environ.get("INTAKE_LAG_PERIOD_S", "0.005"))
    due = time.monotonic() + period

    def tick() -> None:
        nonlocal due
        now = time.monotonic()
        if _writer is not None:
            _writer.write("-", "LAG_ms", time.time(), f"{(now - due) * 1e3:.3f}")
        due = now + period
        loop.call_later(period, tick)

    loop.call_later(period, tick)


# --------------------------------------------------------------------------- what is patched


def _md(self: Any, metadata: Any, *args: Any, **kwargs: Any) -> str:
    return metadata.request_id  # (self, RequestMetadata, ...)


def _pending(self: Any, pending: Any, *args: Any, **kwargs: Any) -> str:
    return pending.metadata.request_id  # (self, PendingRequest, ...)


def _scope(self: Any, scope: Any, *args: Any, **kwargs: Any) -> str | None:
    return header(scope.get("headers", ()))  # an ASGI app's __call__


def _result(self: Any) -> str:
    return self._metadata.request_id  # gRPCReplicaResult


def _grpc_call(self: Any, *args: Any, **kwargs: Any) -> str | None:
    return _rid_of_grpc_call(self)


def _servicer(self: Any, request: Any, *args: Any, **kwargs: Any) -> str:
    return pickle.loads(request.pickled_request_metadata).request_id


def _outgoing(self: Any, request: Any, *args: Any, **kwargs: Any) -> str | None:
    return header(request.headers.raw if hasattr(request.headers, "raw") else request.headers)


def _uvicorn(self: Any) -> str | None:
    return header(self.headers)


_CLIENT = {
    "_client": [("AsyncClient.send", around(Stamp("C0_httpx_send", _outgoing)))],
    "_async.http11": [
        ("AsyncHTTP11Connection._send_request_headers",
         around(Stamp("C1_conn_ready", _outgoing), Stamp("C2_headers_written", _outgoing))),
        ("AsyncHTTP11Connection._send_request_body", around(after=Stamp("C3_body_written", _outgoing))),
    ],
}

PROBES: dict[str, list[tuple[str, Callable[[Any], Any]]]] = {
    # client: the benchmark uses httpx2 when installed, else httpx
    "httpx2._client": _CLIENT["_client"],
    "httpx._client": _CLIENT["_client"],
    "httpcore2._async.http11": _CLIENT["_async.http11"],
    "httpcore._async.http11": _CLIENT["_async.http11"],
    # proxy
    "uvicorn.protocols.http.httptools_impl": [
        ("HttpToolsProtocol.on_headers_complete", around(Stamp("P0_uvicorn_headers", _uvicorn))),
        ("HttpToolsProtocol.on_message_complete", around(Stamp("P0b_uvicorn_body", _uvicorn))),
    ],
    "ray.serve._private.proxy": [
        ("HTTPProxy.__call__", around(Stamp("P1_proxy_asgi_call", _scope))),
        ("HTTPProxy.receive_asgi_messages", around(Stamp("P7_proxy_receive_asgi_called", _md, once=True))),
    ],
    "ray.serve._private.router": [
        ("AsyncioRouter.assign_request",
         around(Stamp("P2_router_task_start", _md), Stamp("P5b_router_assigned", _md))),
    ],
    "ray.serve._private.request_router.request_router": [
        ("RequestRouter._choose_replica_for_request", around(after=Stamp("P3_replica_chosen", _pending))),
    ],
    "ray.serve._private.request_router.replica_wrapper": [
        ("gRPCReplicaWrapper.send_request_python",
         around(Stamp("P4a_grpc_send", _pending), Stamp("P4b_grpc_call_created", _pending))),
    ],
    "grpc.aio._call": [
        ("UnaryStreamCall.__init__", around(after=Stamp("P4c_inner_call_created", _grpc_call))),
        ("UnaryStreamCall._send_unary_request",
         around(Stamp("P4d_grpc_send_task_start", _grpc_call), Stamp("P4e_grpc_send_done", _grpc_call))),
    ],
    "ray.serve._private.replica_result": [
        ("gRPCReplicaResult.get_rejection_response",
         around(after=Stamp("P5_initial_metadata", _result))),
        ("gRPCReplicaResult.__anext__",
         around(after=Stamp("P6_first_item", _result, once=True))),
    ],
    # gateway (and engine) replica
    "grpc._utilities": [("DictionaryGenericHandler.service", _count_accepts)],
    "ray.serve._private.replica": [
        ("Replica.HandleRequestWithRejectionStreaming",
         streaming(Stamp("R0_grpc_servicer_start", _servicer), Stamp("R9_first_response_item", _servicer),
                   lag_probe=True)),
        ("Replica.handle_request_with_rejection", streaming(first_item=Stamp("R1_accepted", _md))),
        ("Replica._unpack_proxy_args", around(Stamp("R1a_unpack_start", _md), Stamp("R1b_unpack_end", _md))),
        # Wrapped as a plain function: it hands back whatever the original returns (a coroutine, or a future when
        # user code runs on its own thread), stamping when Serve calls it.
        ("UserCallableWrapper._call_http_entrypoint",
         lambda original: around(Stamp("R3_http_entrypoint_call", _serve_context_rid))(_as_plain(original))),
    ],
    "ray.serve._private.http_util": [
        ("ASGIReceiveProxy.__call__",
         around(after=Stamp("R5_first_body_msg", lambda self: self._request_metadata.request_id, once=True))),
    ],
    "deployments.http_api": [("AuthMiddleware.__call__", around(Stamp("R4_auth_middleware", _scope)))],
}
"""Module name -> (``Class.attribute``, wrapper factory) pairs, attached right after the module is executed."""


def _as_plain(fn: Any) -> Any:
    """``fn`` behind a plain function, so that ``around`` wraps it without awaiting it."""
    return lambda *args, **kwargs: fn(*args, **kwargs)


def attach(module: Any, probes: list[tuple[str, Callable[[Any], Any]]]) -> None:
    """Replaces each ``Class.attribute`` of ``module`` with its wrapped self; a probe that fails is skipped."""
    for path, factory in probes:
        owner_name, _, attr = path.rpartition(".")
        try:
            owner = getattr(module, owner_name)
            original = getattr(owner, attr)
            setattr(owner, attr, functools.wraps(original)(factory(original)))
        except Exception as e:
            sys.stderr.write(f"{NOTE} skipped {module.__name__}.{path} in pid {os.getpid()}: {e!r}\n")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``PROBES``' modules through the other finders, then attaches the probes once each has run."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PROBES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_attach(module: Any) -> None:
            exec_module(module)
            attach(module, PROBES[name])

        spec.loader.exec_module = exec_and_attach
        return spec


def install(directory: str) -> None:
    """Starts tracing into ``directory``: modules in ``PROBES`` imported from now on get their probes."""
    global _writer
    if _writer is None:
        _writer = _Writer(directory)
        atexit.register(_writer.close)
        sys.meta_path.insert(0, _PatchOnImport())


if os.environ.get(TRACE_DIR_ENV):
    install(os.environ[TRACE_DIR_ENV])
