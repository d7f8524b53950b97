"""`StreamDeps`: what every `StreamSession` shares, built once by the app."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.trace import Tracer

from ext_proc.exchange.join import AccessLogJoin
from ext_proc.exchange.phases import PhaseSpans
from ext_proc.policy.request_policy import RequestPolicy
from ext_proc.request.seams import Propagator, PropagatorSource, StreamObserver


@dataclass(frozen=True, slots=True)
class StreamDeps:
    """Everything a session needs, built once by the app."""

    tracer: Tracer
    propagator: Propagator
    attributes_namespace: str
    metadata_namespace: str
    observers: tuple[StreamObserver, ...] = ()
    propagators: PropagatorSource | None = None  # for routes that override propagation
    policy: RequestPolicy | None = None  # tenants, sampling, redaction
    graceful_close: bool = True  # Envoy runs with ext_proc_graceful_grpc_close
    upstream_span: bool = False  # a CLIENT span around the upstream call
    finalizer: AccessLogJoin | None = None  # joins Envoy's access log (ALS) entries
    # Always ask Envoy for the response phase (mode_override), e.g. with --workers N,
    # where a request's access-log entry may reach another process than its stream.
    response_phase: bool = False
    phases: PhaseSpans | None = None  # phase spans from the access log (with `finalizer`)
