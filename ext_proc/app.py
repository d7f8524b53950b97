"""Composition root and process lifecycle: build, serve, shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from loguru import logger

import ext_proc
from ext_proc import h2grpc
from ext_proc._gen.envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from ext_proc.config import Settings
from ext_proc.config.sampling import SamplingSettings
from ext_proc.exchange.join import AccessLogJoin
from ext_proc.exchange.phases import PhaseSpans
from ext_proc.exchange.servicer import ExternalProcessor
from ext_proc.exchange.session import StreamDeps
from ext_proc.exchange.unasked import CachedPaths, RouteTemplates, UnaskedRequests
from ext_proc.policy.propagation import PropagatorCache, Rejections
from ext_proc.policy.redaction import Redactor
from ext_proc.policy.request_policy import RequestPolicy
from ext_proc.policy.sampling import (
    KeepErrorsProcessor,
    RulesWatcher,
    SamplingPolicy,
    build_sampling,
    load_rules,
)
from ext_proc.policy.tenants import TenantResolver
from ext_proc.request.route_options import RouteOptionsCache
from ext_proc.request.seams import Bounded, StreamObserver
from ext_proc.telemetry.access_lines import AccessLog
from ext_proc.telemetry.lean_span import LeanTracer
from ext_proc.telemetry.metrics.wiring import Observability, build_observability
from ext_proc.telemetry.provider import Telemetry, build_telemetry
from ext_proc.tls import bind

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
PROCESS_METHOD = f"/{SERVICE_NAME}/Process"


@dataclass
class Sidecar:
    """A built, not yet started, sidecar: everything `serve` needs."""

    settings: Settings
    telemetry: Telemetry
    processor: ExternalProcessor
    health: health.aio.HealthServicer
    server: grpc.aio.Server | h2grpc.Server
    rejections: Rejections
    sampling: SamplingPolicy
    port: int = 0
    rules_watcher: RulesWatcher | None = None
    sampling_digest: str | None = None  # of the rules file read at startup
    join: AccessLogJoin | None = None
    observability: Observability | None = None
    serving: bool = False  # /readyz: the gRPC server serves and is not shutting down
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set as stop() begins
    admin_port: int | None = None
    bounded: tuple[Bounded, ...] = ()  # its caches and waiting sets (extproc.state.*)

    async def start(self) -> int:
        # TLS/mTLS when configured; a plaintext non-loopback listen needs the opt-in
        self.port = bind(self.server, self.settings.server)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        if self.observability is not None:
            try:
                self.admin_port = await self.observability.start(lambda: self.serving,
                                                                 self.effective_config)
            except OSError as exc:
                raise OSError(f"admin.listen {self.settings.admin.listen}: {exc}") from exc
        self._watch_rules()
        return self.port

    def effective_config(self) -> dict[str, object]:
        """Settings (secrets masked) plus the sampling rules in force right now."""
        return {**self.settings.model_dump(mode="json"),
                "sampling_active": self.sampling.describe()}

    def _watch_rules(self) -> None:
        sampling = self.settings.sampling
        if sampling.rules_file is None:
            return

        self.rules_watcher = RulesWatcher(
            sampling.rules_file, self.sampling.reload, base=sampling,
            interval_s=sampling.reload_interval_s, loaded_digest=self.sampling_digest)
        self.rules_watcher.start()

    async def stop(self) -> None:
        grace = self.settings.server.grace_s
        logger.info("stopping", grace_s=grace, active_streams=len(self.processor.active))
        self.serving = False
        self.stopping.set()
        if self.rules_watcher is not None:
            await self.rules_watcher.stop()
        await self.health.enter_graceful_shutdown()
        # New ext_proc streams are refused from here (Envoy lets those requests through
        # untraced); in-flight ones, and requests whose access-log entry is still to
        # come (with the lean envoy.yaml every request outlives its stream), get up to
        # `grace`. The server keeps taking Envoy's access-log streams meanwhile: an Envoy
        # worker opens its stream with its first entry, which may come only now.
        self.processor.accepting = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.processor.drained()
                if self.join is not None:
                    await self.join.settled()
        await self.server.stop(0)
        if self.join is not None:
            self.join.flush()  # end every span still waiting for Envoy's access log
        self.telemetry.shutdown()
        if self.observability is not None:
            await self.observability.stop()
        logger.info("stopped")


def build_sampling_policy(settings: Settings) -> tuple[SamplingPolicy, str | None]:
    """The sampling policy with the rules file applied, and that file's digest.
    Raises RulesFileError when the file is bad."""
    base = settings.sampling

    def build(sampling: SamplingSettings) -> SamplingPolicy:  # the prefilter's shape too
        return build_sampling(sampling, tenants=settings.tenants,
                              extract=settings.propagation.extract,
                              counted=settings.stream.join_access_log)
    if base.rules_file is None:
        return build(base), None
    loaded = load_rules(base.rules_file, base)
    return build(loaded.settings), loaded.digest


def build_sidecar(settings: Settings, telemetry: Telemetry | None = None) -> Sidecar:
    observability = build_observability(settings)
    sampling, digest = build_sampling_policy(settings)
    keep = settings.sampling.keep_errors
    telemetry = telemetry or build_telemetry(
        sampler=sampling.sampler, span_stats=observability.span_stats,
        wrap=lambda inner: KeepErrorsProcessor.from_settings(inner, keep, time.monotonic))
    rejections = Rejections()
    propagators = PropagatorCache(rejections)
    stream = settings.stream
    observers = (AccessLog(),) * settings.log.access_log + tuple(observability.observers)
    redactor, tenants = Redactor(settings.redaction), TenantResolver(settings.tenants)
    routes = RouteTemplates()  # learnt from asked exchanges, for the un-asked ones
    paths = CachedPaths(lambda raw: redactor.path_and_query(raw)[0])
    join = AccessLogJoin(stream.join_timeout_s, stream.response_wait_s,
                         unasked=unasked_requests(observers, paths, tenants, routes),
                         namespace=stream.metadata_namespace) \
        if stream.join_access_log else None
    deps = StreamDeps(
        tracer=telemetry.tracer,
        propagator=propagators.get(settings.propagation),
        propagators=propagators,
        policy=RequestPolicy(redactor, sampling, tenants),
        attributes_namespace=settings.stream.attributes_namespace,
        metadata_namespace=settings.stream.metadata_namespace,
        graceful_close=settings.stream.graceful_close,
        upstream_span=settings.stream.upstream_span,
        finalizer=join,
        # with several workers a request's access-log entry may reach another worker
        response_phase=settings.server.workers > 1,
        phases=PhaseSpans(telemetry.tracer, stream.phase_spans, join.service)
        if join is not None and isinstance(telemetry.tracer, LeanTracer) else None,
        observers=(*observers, routes) if observers and join is not None else observers,
    )
    route_options = RouteOptionsCache(settings.propagation)
    processor = ExternalProcessor(deps, route_options, phase_timer=observability.phase_timer)
    server = build_server(settings)
    exporter = getattr(telemetry.exporter, "bounded", None)
    bounded = (*propagators.bounded(), *route_options.bounded(), *routes.bounded(),
               *paths.bounded(), *(join.bounded() if join is not None else ()),
               *sampling.bounded(), *(exporter() if exporter is not None else ()),
               *(Bounded(*b) for b in getattr(server, "bounded", tuple)()),
               *observability.bounded())
    observability.watch(lambda: len(processor.active), rejections.snapshot,
                        server=(lambda: getattr(server, "shed", 0),
                                lambda: getattr(server, "protocol_errors", 0)),
                        bounded=bounded)
    pb_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    if isinstance(server, h2grpc.Server):  # no task or generator per stream
        server.add_direct_method(PROCESS_METHOD, processor.direct_method())
    if join is not None:
        join.service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return Sidecar(settings, telemetry, processor, health_servicer, server, rejections,
                   sampling, sampling_digest=digest, observability=observability, join=join,
                   bounded=bounded)


def unasked_requests(observers: tuple[StreamObserver, ...], paths: CachedPaths,
                     tenants: TenantResolver, routes: RouteTemplates,
                     ) -> Callable[[list[HTTPAccessLogEntry]], None] | None:
    """What counts the requests Envoy did not ask about (from its access log), if any
    observer wants them: url.path redacted as on spans, the tenant from logged headers."""
    if not observers:
        return None
    return UnaskedRequests(observers, path=paths,
                           tenant=lambda headers: tenants.resolve(headers, {}),
                           routes=routes).handle


def build_server(settings: Settings) -> grpc.aio.Server | h2grpc.Server:
    """The gRPC server of `server.engine`, no services yet."""
    server_settings = settings.server
    # SO_REUSEPORT off for one process, so a taken port is an error; on when several
    # workers share the port (ext_proc.workers).
    reuse_port = server_settings.workers > 1
    if server_settings.engine == "h2":
        return h2grpc.Server(
            max_concurrent_streams=server_settings.max_concurrent_streams,
            max_receive_message_length=server_settings.max_receive_message_bytes,
            reuse_port=reuse_port, max_backlog=server_settings.max_backlog,
            sheddable=(PROCESS_METHOD,), http2_layer=server_settings.http2_layer)
    return grpc.aio.server(options=[
        ("grpc.max_concurrent_streams", server_settings.max_concurrent_streams),
        ("grpc.max_receive_message_length", server_settings.max_receive_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
    ])


class _SignalCatcher:
    """First SIGTERM/SIGINT asks for a graceful stop; a second one forces exit."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._loop = asyncio.get_running_loop()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _SignalCatcher:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stop.is_set():
            raise SystemExit(1)  # force exit on the second signal
        logger.info("signal received", signal=signal.Signals(signum).name)
        self._loop.call_soon_threadsafe(self._stop.set)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    sidecar = build_sidecar(settings)
    stop = asyncio.Event()
    with _SignalCatcher(stop):
        try:
            port = await sidecar.start()
        except BaseException:
            await sidecar.server.stop(0)  # release what started, on this loop
            sidecar.telemetry.shutdown()
            raise
        logger.info("started", listen=settings.server.listen, port=port,
                    version=ext_proc.__version__)
        await stop.wait()
        await sidecar.stop()
    await logger.complete()


def run(settings: Settings) -> None:
    """`serve` on the event loop `server.event_loop` names (uvloop when installed, by
    default: it halves grpc.aio's wake-up latency; see bench/README.md)."""
    factory = None
    if settings.server.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.server.event_loop == "uvloop":
                raise
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(settings))
