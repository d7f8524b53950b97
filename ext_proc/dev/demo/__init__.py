"""Demo upstreams, an in-process OTLP receiver and a terminal trace-tree view.

This package module holds the few helpers both demo services share: OTLP trace
export configured from the standard ``OTEL_*`` variables, flat JSON log lines
with trace correlation (also sent as OTLP log records with ``--otlp-logs``, as
the compose stack does to get them into Loki), and ``HOST:PORT`` parsing. Each
service's ``main`` calls them once at start-up (the process entry point is the
composition root).
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
from collections.abc import Mapping, Sequence
from typing import Final, TextIO

from loguru import logger
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

#: The demo user directory shared by the HTTP and the gRPC service.
SEED_USERS: Final = (
    (1, "Ada Lovelace", "ada@example.com"),
    (2, "Alan Turing", "alan@example.com"),
    (3, "Grace Hopper", "grace@example.com"),
)

_LISTEN_RE: Final = re.compile(r"^\[?(?P<host>[^\[\]]*?)\]?:(?P<port>\d{1,5})$")
_PROTOCOL_GRPC: Final = "grpc"
_PROTOCOL_HTTP: Final = "http/protobuf"
_UNKNOWN_SERVICE: Final = "unknown_service"


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (IPv6 in brackets) -> (host, port); None when malformed."""
    match = _LISTEN_RE.match(text.strip())
    if match is None or not match.group("host"):
        return None
    port = int(match.group("port"))
    return (match.group("host"), port) if port <= 65535 else None


def _exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    """The OTLP span exporter chosen by ``OTEL_TRACES_EXPORTER`` and the protocol vars."""
    names = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if names in ("", "none") or "otlp" not in names.split(","):
        return None
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    ).strip().lower() or _PROTOCOL_GRPC
    if protocol == _PROTOCOL_HTTP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    if protocol != _PROTOCOL_GRPC:
        logger.warning("unsupported OTLP protocol, using grpc", protocol=protocol)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def build_tracer_provider(default_service: str, environ: Mapping[str, str]) -> TracerProvider:
    """A tracer provider exporting over OTLP as the standard env vars say.

    ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` win over ``default_service``;
    ``OTEL_TRACES_EXPORTER=none`` disables export; ``OTEL_BSP_*`` tune the batch
    processor; the exporters read ``OTEL_EXPORTER_OTLP_*`` themselves.
    """
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith(_UNKNOWN_SERVICE):
        resource = resource.merge(Resource({SERVICE_NAME: default_service}))
    provider = TracerProvider(resource=resource)
    exporter = _exporter(environ)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def configure_logging(service: str, stream: TextIO | None = None) -> None:
    """The sidecar's own JSON lines (``ext_proc.telemetry.logs``), each also naming `service`."""
    from ext_proc.config import LogSettings
    from ext_proc.telemetry.logs import configure_logging as configure_sidecar_logging

    configure_sidecar_logging(LogSettings(), stream)
    logger.configure(extra={"service": service})


def install_otlp_logs(provider: TracerProvider) -> None:
    """Send every log record also through the OTel logs SDK (exporter from
    ``OTEL_LOGS_EXPORTER``, default otlp), with the span's trace_id/span_id and the
    tracer provider's resource; flushed at exit."""
    from ext_proc.config.telemetry import OtlpLogsSettings
    from ext_proc.telemetry.otlp_logs import build_otlp_logs

    pipeline = build_otlp_logs(OtlpLogsSettings(enabled=True), provider.resource)
    if pipeline is not None:
        pipeline.install()
        atexit.register(pipeline.shutdown)


def service_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, service: str,
) -> tuple[argparse.Namespace, tuple[str, int], TracerProvider]:
    """Parse a demo service's command line (it must have ``--listen``), then set up its
    tracer provider and correlated logging from the standard OTEL_* variables."""
    parser.add_argument("--otlp-logs", action="store_true",
                        help="also send the log lines as OTLP log records (OTEL_LOGS_EXPORTER)")
    args = parser.parse_args(argv)
    address = parse_listen(args.listen)
    if address is None:
        parser.error(f"--listen must be HOST:PORT, got {args.listen!r}")
    provider = build_tracer_provider(service, os.environ)
    configure_logging(str(provider.resource.attributes.get("service.name", service)))
    if args.otlp_logs:
        install_otlp_logs(provider)
    return args, address, provider
