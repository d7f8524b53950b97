"""Everything beyond traces, built once and handed to the app: metrics, OTLP logs, admin.

`app.build_sidecar` calls `build_observability`, passes `span_stats` to
`build_telemetry`, `observers` to `StreamDeps`, `phase_timer` to the servicer,
then `watch(...)`; `Sidecar.start/stop` call `start`/`stop`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from opentelemetry.sdk.resources import Resource

from ext_proc.admin import AdminEndpoints, AdminServer
from ext_proc.config import Settings
from ext_proc.request.seams import Bounded, StreamObserver
from ext_proc.telemetry.metrics.pipeline import Metrics, build_metrics
from ext_proc.telemetry.metrics.spans import SpanPipelineStats
from ext_proc.telemetry.otel_env import build_resource
from ext_proc.telemetry.otlp_logs import OtlpLogs, build_otlp_logs


@dataclass
class Observability:
    settings: Settings
    metrics: Metrics | None
    logs: OtlpLogs | None
    admin: AdminServer | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def span_stats(self) -> SpanPipelineStats | None:
        return self.metrics.spans if self.metrics else None

    @property
    def observers(self) -> tuple[StreamObserver, ...]:
        red = self.metrics.red if self.metrics else None
        return (red,) if red is not None else ()

    @property
    def phase_timer(self) -> Callable[[str | None, int], None] | None:
        runtime = self.metrics.runtime if self.metrics else None
        return runtime.phase_done if runtime is not None else None

    def watch(self, active_streams: Callable[[], int],
              rejections: Callable[[], dict[str, int]],
              server: tuple[Callable[[], int], Callable[[], int]] | None = None,
              bounded: Iterable[Bounded] = ()) -> None:
        """Observe live values of the built app (called once); `bounded`: the app's
        caches and waiting sets, the metric tables' (`bounded()`) among them."""
        runtime = self.metrics.runtime if self.metrics else None
        if runtime is not None:
            runtime.observe_streams(active_streams)
            runtime.observe_rejections(rejections)
            if server is not None:  # (streams shed, protocol errors) of the h2 engine
                runtime.observe_server(*server)
            runtime.observe_state(bounded)

    def bounded(self) -> tuple[Bounded, ...]:
        """The metric tables' attribute sets."""
        if self.metrics is None:
            return ()
        tables = (*(self.metrics.red.tables if self.metrics.red else ()),
                  *(self.metrics.runtime.tables if self.metrics.runtime else ()))
        return tuple(table.bounded() for table in tables)

    async def start(self, ready: Callable[[], bool],
                    config: Callable[[], dict[str, object]] | None = None) -> int | None:
        """Install the OTLP log sink and start the admin endpoint; returns its port."""
        if self.logs is not None:
            self.logs.install()
        if self.settings.admin.listen is None:
            return None
        pull = self.metrics.pull if self.metrics else None
        self.admin = AdminServer(self.settings.admin, AdminEndpoints(
            ready=ready,
            config=config or (lambda: self.settings.model_dump(mode="json")),
            scrape=pull.scrape if pull is not None else None,
        ))
        return await self.admin.start()

    async def stop(self) -> None:
        """Final metrics export, log flush, then the admin endpoint (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.metrics is not None:
                # best effort, and short: it must not hold the exit for the whole grace
                self.metrics.shutdown(timeout_s=min(self.settings.server.grace_s, 2.0))
            if self.logs is not None:
                self.logs.shutdown()
        finally:
            if self.admin is not None:
                await self.admin.stop()


def build_observability(settings: Settings, resource: Resource | None = None,
                        env: Mapping[str, str] | None = None) -> Observability:
    """Metrics (with a scrape reader when the admin endpoint is on) and OTLP logs."""
    resource = resource or build_resource()
    pull = settings.admin.listen is not None and settings.admin.metrics
    metrics = build_metrics(settings.metrics, resource, pull=pull, env=env)
    return Observability(settings, metrics, build_otlp_logs(settings.otlp_logs, resource, env=env))
