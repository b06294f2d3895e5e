"""vLLM engine applications: Ray's ``LLMServer`` (``ray.serve.llm``) speaking the gateway protocol.

Called by ``deployments.engines.build_app`` for ``runtime: vllm``. The server subclass takes the raw
OpenAI body in one ``generate`` method (``arks_ray.engines.protocol``), so the gateway never imports vLLM.

It also feeds the SLO autoscaling policy (``deployments.autoscaling``): ``generate`` times every request
(TTFT, TPOT, requests in flight), a stat logger added to vLLM's engine takes the scheduler's queue and
KV-cache use after each step, and ``record_autoscaling_stats`` reports them to Serve
(``arks_ray.autoscaling.replica``).

A single-GPU engine runs the model inside vLLM's EngineCore process, as ``vllm serve`` does
(``arks_ray.engines.executor`` says when): the replica actor holds the GPU, and the engine config and the
model download run in the replica rather than in Ray tasks (``InProcessVLLMEngine``). On a replica that holds
a GPU, vLLM's EngineCore is forked from a server that imported vLLM while the replica did, as ``vllm serve``
forks it, rather than spawned after (``deployments.engine_start``).

Streams leave the replica coalesced: the first output at once, then one item per interval, which grows
with the streams the replica serves (``arks_ray.engines.cadence``; every item costs CPU in each Serve hop
behind it); ``user_config.stream_interval_ms`` and ``stream_interval_max_ms`` change it live. Before that,
vLLM hands each stream's tokens to its OpenAI layer in the replica every few tokens (the stride: about one
interval's worth at the replica's recent TPOT, at most ``user_config.stream_stride_max_tokens``), unless the
engine args pin vLLM's ``--stream-interval``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from arks_ray.autoscaling.config import replica_stats
from arks_ray.autoscaling.replica import ReplicaStats
from arks_ray.engines import cadence
from arks_ray.engines.executor import EXECUTOR_KEY, IN_PROCESS, choose_executor
from arks_ray.engines.protocol import EngineItem, EngineRequest, wants_running_usage
from arks_ray.engines.sse import StreamMeter
from arks_ray.engines.vllm_server import VLLM_SERVER, check_server_frontend, frontend
from deployments.engine_stream import engine_items
from deployments.lora import AdapterTable, install_loader, resolve_adapter
from deployments.responses import responses_items

if TYPE_CHECKING:
    from ray.serve import Application

    from deployments.engines import EngineAppArgs


logger = logging.getLogger("ray.serve.arks.engines")


def _stat_logger(stats: ReplicaStats) -> Any:
    """A vLLM stat logger passing each engine step's scheduler counters to ``stats`` (summed over DP ranks)."""
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    class ArksStatLogger(AggregateStatLoggerBase):
        def __init__(self) -> None:
            self._engines: dict[int, tuple[int, int, float]] = {}

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is None:
                return
            self._engines[engine_idx] = (
                scheduler_stats.num_running_reqs,
                scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                scheduler_stats.kv_cache_usage)
            running, waiting, kv = zip(*self._engines.values(), strict=True)
            stats.scheduler(sum(running), sum(waiting), max(kv), time.monotonic())

        def log_engine_initialized(self) -> None:
            pass

    return ArksStatLogger()


def attach_engine_stats(engine: Any, stats: ReplicaStats) -> bool:
    """Add the stat logger to the running vLLM ``AsyncLLM`` behind Ray's ``VLLMEngine``.

    vLLM's AsyncLLM takes stat loggers only when built (Ray builds it), so this appends to its logger
    manager's list. Without one (``disable_log_stats``, another engine) the queue and KV-cache signals are
    absent, which the policy tolerates, and the log says so."""
    manager = getattr(getattr(engine, "_engine_client", None), "logger_manager", None)
    loggers = getattr(manager, "stat_loggers", None)
    if not isinstance(loggers, list):
        logger.warning("vLLM engine stats are unavailable (no stat logger manager): autoscaling gets no "
                       "queue or KV-cache signal from this replica")
        return False
    loggers.append(_stat_logger(stats))
    return True


def output_processor(engine: Any) -> Any | None:
    """vLLM's ``OutputProcessor`` behind Ray's ``VLLMEngine``, if it takes a stride: its ``stream_interval``, which
    its ``add_request`` gives each new request (``tests/unit/test_engine_stride.py`` holds that text of vLLM's)."""
    processor = getattr(getattr(engine, "_engine_client", None), "output_processor", None)
    value = getattr(processor, "stream_interval", None)
    return processor if isinstance(value, int) and not isinstance(value, bool) else None


STREAM_INTERVAL_MS = cadence.BASE_MS
"""How long the engine coalesces stream chunks into one item for the gateway while the replica serves up to
``cadence.KNEE_STREAMS`` streams, unless the app's LLMConfig ``experimental_configs.
stream_batching_interval_ms`` or the deployment's ``user_config.stream_interval_ms`` says otherwise. Ray's
default is 50 ms. Each item costs CPU in every Serve hop (the engine replica, the gateway, the proxy), and
on an H200 those hops bound throughput: 20 / 50 / 100 ms gave 2379 / 4101 / 4909 output tokens/s at 128
streams (benchmarks/results/gpu_after.json). Beyond the knee the interval grows with the streams, up to
``user_config.stream_interval_max_ms`` (``cadence.MAX_MS``; set it to the base for a fixed interval). The
first output is never held back (``_batch_output_stream``); a client sees later tokens in bursts of up to
one interval."""


def carries_output(item: Any) -> bool:
    """Whether a stream item holds output (or ends the stream): anything but vLLM's role-only first chunk."""
    return not (isinstance(item, str) and '"role":' in item and '"content":""' in item and '"text":"' not in item)


def in_process(llm_config: Any) -> bool:
    """Whether ``build_vllm`` chose the in-process executor for this (Ray) ``LLMConfig``."""
    return bool(llm_config.experimental_configs.get(EXECUTOR_KEY) == IN_PROCESS)


def _in_process_engine_class() -> type:
    """Ray's ``VLLMEngine`` on the replica's own GPU, defined lazily (importing it imports vLLM)."""
    import importlib

    from ray.llm._internal.serve.engines.vllm.vllm_engine import (
        VLLMEngine,
        _normalize_vllm_engine_kwargs,
        _resolve_hf_model_id_from_mirror,
    )
    from ray.llm._internal.serve.utils.node_initialization_utils import initialize_remote_node
    from vllm.engine.arg_utils import AsyncEngineArgs

    # vLLM's FrontendArgs has moved between releases; take the one Ray's engine uses.
    ray_vllm: Any = importlib.import_module(VLLMEngine.__module__)

    class InProcessVLLMEngine(VLLMEngine):
        """vLLM with its ``uni`` executor in a replica that holds the GPU. Ray starts one task for the model
        download on each node of the placement group, and one on the GPU for the engine config (each a new
        process importing torch or vLLM): both run here instead, since the one bundle is this replica's."""

        async def start(self) -> None:
            if not self._running:
                callback: Any = self.llm_config.get_or_create_callback()
                if callback.ctx.run_init_node:
                    await asyncio.to_thread(initialize_remote_node, self.llm_config)
                    callback.ctx.run_init_node = False
            await super().start()

        def _prepare_engine_config(self, callback_ctx: Any) -> tuple[Any, Any, Any]:
            from vllm.usage.usage_lib import UsageContext

            engine_config: Any = self.llm_config.get_engine_config()
            _resolve_hf_model_id_from_mirror(engine_config)
            kwargs = _normalize_vllm_engine_kwargs(engine_config.get_initialization_kwargs())
            kwargs["distributed_executor_backend"] = IN_PROCESS
            engine_args = AsyncEngineArgs(**kwargs)
            vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            return engine_args, ray_vllm.FrontendArgs(**engine_config.frontend_kwargs), vllm_config

    return InProcessVLLMEngine


def usage_report(llm_config: Any) -> asyncio.Future[None] | None:
    """Ray LLM's usage report for this model, sent without holding up the replica.

    Ray's ``LLMServer`` sends it once its engine has started, and waits: it gets or creates a detached actor
    (a worker process of its own) and calls it. That was 5.8 s of the engine replica's start on the H200
    machine, after the engine was ready. With Ray's usage stats off (``arks-ray up`` starts Ray so, or
    ``RAY_USAGE_STATS_ENABLED=0``) nothing reads the report, and no actor is made. Otherwise a thread sends it."""
    from ray._common.usage.usage_lib import usage_stats_enabled

    if not usage_stats_enabled():
        return None
    from ray.llm._internal.serve.observability.usage_telemetry.usage import push_telemetry_report_for_all_models

    return asyncio.get_running_loop().run_in_executor(
        None, functools.partial(push_telemetry_report_for_all_models, all_models=[llm_config]))


def executor_options(options: dict[str, Any], llm_config: Any) -> dict[str, Any]:
    """A replica's deployment ``options`` for its executor: with the in-process one the replica actor takes its
    bundle's GPU, so that vLLM's EngineCore, its child process, sees the GPU (Ray sets ``CUDA_VISIBLE_DEVICES``)."""
    if in_process(llm_config):
        options["ray_actor_options"]["num_gpus"] = 1
    return options


@functools.cache
def _llm_server_class() -> type:
    """Define the subclass lazily: importing this module must not import vLLM (e.g. for the gateway, or for
    Serve's build task). The replica finds it as ``deployments.vllm_engine.ArksLLMServer`` (``__getattr__``)."""
    from ray.serve.llm import LLMServer

    class ArksLLMServer(LLMServer):
        """Ray's LLMServer with the gateway protocol on top, reporting autoscaling stats."""

        @classmethod
        def get_deployment_options(cls, llm_config: Any) -> dict[str, Any]:  # type: ignore[override]
            """Ray's options, for the executor chosen (``executor_options``)."""
            return executor_options(super().get_deployment_options(llm_config), llm_config)

        def _init_shared(self, llm_config: Any, engine_cls: Any = None, *args: Any, **kwargs: Any) -> None:
            if engine_cls is None and in_process(llm_config):
                engine_cls = _in_process_engine_class()
            super()._init_shared(llm_config, engine_cls, *args, **kwargs)
            self._llm_config.experimental_configs.setdefault("stream_batching_interval_ms", STREAM_INTERVAL_MS)
            self._arks_stats = replica_stats(llm_config.deployment_config or {})
            self._arks_interval_max_ms = cadence.MAX_MS
            self._arks_stride_max = cadence.STRIDE_MAX_TOKENS
            pinned = (llm_config.engine_kwargs or {}).get("stream_interval")
            self._arks_stride_pinned: int | None = None if pinned is None else int(pinned)
            self._arks_outputs: Any = None

        def _init_multiplex_loader(self, model_downloader_cls: Any = None) -> None:
            # LoRA adapters come from the table in user_config (deployments.lora), not Ray's cloud loader.
            self._arks_adapters = AdapterTable()
            multiplex = self._llm_config.multiplex_config()
            if multiplex is None:
                super()._init_multiplex_loader(model_downloader_cls)
            else:
                install_loader(self, self._arks_adapters, multiplex.max_num_models_per_replica)

        async def _maybe_resolve_lora_from_multiplex(self) -> None:
            await resolve_adapter(self, self._arks_adapters)

        async def start(self) -> None:
            await super().start()  # type: ignore[no-untyped-call]
            if self.engine is not None:
                attach_engine_stats(self.engine, self._arks_stats)
                self._arks_outputs = output_processor(self.engine)
                if self._arks_outputs is None:
                    logger.warning("vLLM's output processor takes no stride here: it hands over every token, "
                                   "and the replica formats an event per token")

        async def _start_engine(self) -> None:
            # Ray's (tests/unit/test_engine_executor.py holds its text), but the usage report does not hold up
            # the replica (usage_report), and vLLM's EngineCore is forked from the replica's fork server if it
            # has one (deployments.engine_start).
            from ray._common.usage.usage_lib import TagKey, record_extra_usage_tag
            from ray.llm._internal.serve.constants import RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING

            from deployments.engine_start import engine_processes

            if self.engine is None:
                raise ValueError("Engine is not set")
            with engine_processes():
                await self.engine.start()  # type: ignore[no-untyped-call]
            self._arks_usage_report = usage_report(self._llm_config)
            if RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING:
                record_extra_usage_tag(TagKey.LLM_SERVE_DIRECT_STREAMING_ENABLED, "1")

        async def record_autoscaling_stats(self) -> dict[str, float]:
            """Serve's hook: this replica's TTFT/TPOT percentiles, queue depth and KV-cache use."""
            return self._arks_stats.report(time.monotonic())

        def reconfigure(self, config: dict[str, Any] | None) -> None:
            """Serve's ``user_config``, applied live to the streams that start after it:
            ``stream_interval_ms`` is how long stream chunks are coalesced into one item up to
            ``cadence.KNEE_STREAMS`` streams (``STREAM_INTERVAL_MS`` by default; 0 sends every chunk on its
            own), ``stream_interval_max_ms`` how far that grows under more streams (``cadence.MAX_MS``)."""
            # Checked before anything is applied: a refused user_config changes nothing.
            interval, ceiling = cadence.user_intervals(config)
            stride_max = cadence.user_stride(config)
            self._arks_adapters.update(config)  # LoRA adapters: deployments.lora
            if interval is not None:
                self._llm_config.experimental_configs["stream_batching_interval_ms"] = interval
            if ceiling is not None:
                self._arks_interval_max_ms = ceiling
            if stride_max is not None:
                self._arks_stride_max = stride_max

        def _arks_stride(self) -> int:
            """The stride of a stream starting now (``cadence.token_stride``), set on vLLM's output processor for
            the requests it adds next. Engine args that pin ``stream_interval`` keep theirs.

            The attribute is the engine's, not the request's (vLLM 0.26 has no other), and vLLM reads it when it
            adds the request, after the chat template and any LoRA load: a request may get the stride set for the
            next one. Only the cadence depends on that; what a stream is charged does not (``_arks_running``)."""
            outputs = self._arks_outputs
            if outputs is None:
                return self._arks_stride_pinned or 1
            if self._arks_stride_pinned is None:
                interval = self._get_batch_interval_ms()
                tpot = self._arks_stats.typical_tpot_ms(time.monotonic(), remembered=True)
                outputs.stream_interval = cadence.token_stride(float(interval or 0), tpot, self._arks_stride_max)
            return int(outputs.stream_interval)

        def _arks_running(self) -> bool:
            """Whether streams ask vLLM for the running usage on every event: whenever an event may carry more than
            one token here, so that a stream cut short is charged the tokens relayed (``StreamMeter``)."""
            if self._arks_stride_pinned is not None:
                return self._arks_stride_pinned > 1
            return self._arks_outputs is not None and self._arks_stride_max > 1

        def _get_batch_interval_ms(self, stream: bool = True) -> Any:
            # Ray's hook for each new stream's Batcher: the base interval, stretched by this replica's load.
            base = super()._get_batch_interval_ms(stream)
            if base is None:
                return None
            return cadence.interval_ms(float(base), self._arks_interval_max_ms, self._arks_stats.in_flight)

        def _batch_output_stream(self, generator: Any) -> Any:
            # Ray coalesces stream chunks per interval, which would also hold back the first token by up to
            # one interval; send everything up to and including the first chunk with output at once (with
            # vLLM, the role-only chunk and the first token in one item), then coalesce as Ray does.
            batch = super()._batch_output_stream

            async def first_output_then_batched() -> AsyncIterator[list[Any]]:
                head: list[Any] = []
                while not head or not carries_output(head[-1]):
                    try:
                        head.append(await generator.__anext__())
                    except StopAsyncIteration:
                        if head:
                            yield head
                        return
                yield head
                async for items in batch(generator):
                    yield items

            return first_output_then_batched()

        async def generate(self, request: EngineRequest) -> AsyncIterator[EngineItem]:
            """The gateway's port (``arks_ray.engines.protocol``), timed for the autoscaling policy."""
            timer = self._arks_stats.start(time.monotonic())
            # A pooling request sets no stride: vLLM asserts a detokenizer for one (a pooling model serves no
            # streams, so none is set before it either).
            stride = self._arks_stride() if request.kind != "embeddings" else 1
            asked = wants_running_usage(request.body)  # then it comes anyway, and counts exactly
            meter = StreamMeter(request.client_usage, self._arks_running() or asked, asked)
            try:
                on_first = lambda: self._arks_stats.first_output(timer, time.monotonic())  # noqa: E731
                items = responses_items(self, request, on_first, self._maybe_resolve_lora_from_multiplex, stride) \
                    if request.kind == "responses" else engine_items(self, request, on_first, meter)
                async for item in items:
                    yield item
            finally:
                # However the request ends (done, engine error, client gone), it leaves the queue.
                tokens = (meter.usage or {}).get("completion_tokens", meter.completion_tokens)
                self._arks_stats.finish(timer, int(tokens), time.monotonic())

    return ArksLLMServer


def __getattr__(name: str) -> Any:
    # The import path Serve's replica loads its class from (deployments.engine_deployment).
    if name == "ArksLLMServer":
        # The replica's first step: its EngineCore's fork server imports vLLM alongside the import below.
        from deployments.engine_start import prestart

        prestart()
        return _llm_server_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


LLM_REPLICA = f"{__name__}.ArksLLMServer"
SERVER_REPLICA = "deployments.vllm_server.VLLMServerReplica"


def build_vllm(args: EngineAppArgs) -> Application:
    """The engine deployment of one vLLM ArksApplication: Ray's ``LLMServer`` (``ArksLLMServer``) or vLLM's own
    server in a child process (``deployments.vllm_server``), with the options Ray's builder gives an
    ``LLMServer``, computed without importing vLLM where ``deployments.engine_deployment`` can."""
    from arks_ray.render.lora import ENGINE_PREFIX
    from deployments.engine_deployment import builder_options, engine_deployment, modelled, server_options

    try:
        chosen = choose_executor(args.llm_config)
    except ValueError as exc:
        raise ValueError(f"application {args.name}: {exc}") from None
    args = args.model_copy(update={"llm_config": chosen})
    config = args.ray_llm_config()
    server = frontend(chosen) == VLLM_SERVER
    if server:
        try:
            check_server_frontend(config.engine_kwargs, lora=config.multiplex_config() is not None)
        except ValueError as exc:
            raise ValueError(f"application {args.name}: {exc}") from None

    replica = SERVER_REPLICA if server else LLM_REPLICA

    def bound(deployment: Any) -> Application:
        # The replica's class by import path, and its arguments taken after the options: Ray's builder may add
        # engine kwargs (KV events for a KV-aware router).
        deployment = deployment.options(func_or_class=replica)
        if not server:
            return deployment.bind(llm_config=config)  # type: ignore[no-any-return]
        from deployments.vllm_server import ServerConfig

        # Bound to its own small config: unpickling an LLMConfig imports torch, which that replica needs not.
        return deployment.bind(ServerConfig.of(args.name, config))  # type: ignore[no-any-return]

    if modelled(config):
        options = builder_options(executor_options(server_options(config), config), config)
        return bound(engine_deployment(options, replica))
    from ray.serve.llm import build_llm_deployment  # imports vLLM

    built = build_llm_deployment(config, name_prefix=ENGINE_PREFIX, deployment_cls=_llm_server_class())
    # ``_bound_deployment`` is how Serve's own builder reads an Application (ray.serve.deployment.Application).
    return bound(built._bound_deployment)
