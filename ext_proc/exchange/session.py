"""`StreamSession`: one HTTP exchange as seen through one ext_proc stream.

The session starts the gateway SERVER span on ``request_headers`` (at Envoy's
``request.time``) and answers with the traceparent mutation; `record()` runs after
the answer. The span ends exactly once, when the stream has closed and Envoy's
access-log entry for the request has come (or could not: `AccessLogJoin`).
"""

from __future__ import annotations

import time

from loguru import logger
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation import set_span_in_context

from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc.exchange.als import FinalFacts
from ext_proc.exchange.answers import APPENDED, RESPONSE_PHASE, empty_response, trace_metadata
from ext_proc.exchange.deps import StreamDeps
from ext_proc.exchange.outcome import apply, end_client, exchange_outcome
from ext_proc.exchange.phases import upstream_seconds
from ext_proc.exchange.request_info import RequestInfo, request_info
from ext_proc.policy.redaction import REDACTED
from ext_proc.request.envoy_attrs import EnvoyAttributes
from ext_proc.request.headers import Carrier, carrier_from_headers, first, header_mutation
from ext_proc.request.route_options import DEFAULT, RouteOptions
from ext_proc.request.seams import ExchangeRecord, Propagator
from ext_proc.telemetry import semconv as sc


class StreamSession:
    """State of one exchange: small, and released when the stream ends."""

    __slots__ = ("_carrier", "_client", "_closed", "_deps", "_expects_response", "_facts",
                 "_grpc_status", "_options", "_path", "_pending", "_propagator", "_response_attrs",
                 "_start_ns", "_started", "_status", "_tenant", "_upstream", "abandoned",
                 "cancelled", "span")

    def __init__(self, deps: StreamDeps, options: RouteOptions = DEFAULT) -> None:
        self._deps = deps
        self._options = options
        self._propagator = deps.propagator
        if options.propagation is not None and deps.propagators is not None:
            self._propagator = deps.propagators.get(options.propagation)
        self._started = False
        self._tenant: str | None = None
        self._carrier: Carrier | None = None  # kept from one phase until it is recorded
        self.span: Span | None = None
        self._client: Span | None = None  # the optional upstream CLIENT span
        self._upstream: Span | None = None  # the upstream phase (its id only: see phases)
        self._facts: RequestInfo | None = None
        self._path: str | None = None  # url.path, redacted
        self._start_ns = 0
        self._status: int | None = None
        self._grpc_status: str | None = None
        self._response_attrs: EnvoyAttributes | None = None
        self._pending: pb.ProcessingRequest | None = None
        self._closed = False
        self._expects_response = False  # Envoy sends (or was asked for) the response phase
        self.cancelled = False  # set by the servicer when Envoy reset the stream
        self.abandoned = False  # Envoy closed it before our answer reached it (timeout)

    # -- answering (hot path) -------------------------------------------------

    def handle(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """Answer one message. Never raises: a failure yields the phase's no-op answer."""
        phase = request.WhichOneof("request")
        if not self._options.tracing:
            return empty_response(phase)
        try:
            if phase == "request_headers":
                return self._on_request_headers(request)
            if phase == "response_headers":
                return self._on_response_headers(request)
            if phase == "response_trailers":
                self._grpc_status = first(carrier_from_headers(
                    request.response_trailers.trailers), "grpc-status") or self._grpc_status
        except Exception:
            logger.opt(exception=True).error("phase failed", phase=phase)
        return empty_response(phase)

    def _on_request_headers(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if self.span is not None:  # a second request_headers: answer, change nothing
            logger.debug("duplicate request_headers ignored")
            return empty_response("request_headers")
        deps = self._deps
        carrier = carrier_from_headers(request.request_headers.headers)
        attrs = EnvoyAttributes.of(request.attributes, deps.attributes_namespace)
        self._start_ns = attrs.time_ns(sc.EnvoyAttr.REQUEST_TIME) or time.time_ns()
        facts = self._facts = request_info(carrier, self._options.http_route,
                                           self._options.attributes)
        propagator = self._propagator
        parent = propagator.extract(carrier)
        if deps.policy is not None:
            self._tenant = tenant = deps.policy.tenant(carrier, self._options)
            parent = deps.policy.sampling_context(
                parent, carrier, path=facts.path, method=facts.method_original, tenant=tenant,
                route_name=attrs.string(sc.EnvoyAttr.ROUTE_NAME), options=self._options)
        span = self.span = deps.tracer.start_span(
            facts.span_name, context=parent, kind=SpanKind.SERVER,
            attributes=facts.start_attributes, start_time=self._start_ns,
        )
        upstream = self._options.upstream_span
        if deps.phases is not None and (phase := deps.phases.allocate(
                span, self._options.phase_spans)) is not None:
            span = self._upstream = phase  # the upstream phase's id goes upstream
        elif upstream if upstream is not None else deps.upstream_span:
            span = self._client = deps.tracer.start_span(
                facts.span_name, context=set_span_in_context(span, parent), kind=SpanKind.CLIENT)
        out: dict[str, str] = {}
        propagator.inject(set_span_in_context(span, parent), out)
        self._pending = request
        self._carrier = carrier
        answer = pb.ProcessingResponse()  # filled in place: upb copies what it is given
        mutation = answer.request_headers.response.header_mutation
        mutation.SetInParent()  # a request_headers answer even when nothing changes
        header_mutation(out, propagator.removals(carrier, out), into=mutation)
        trace_metadata(deps.metadata_namespace, self.span.get_span_context(),
                       into=answer.dynamic_metadata)
        if self._needs_response_phase(propagator):
            self._expects_response = True
            answer.mode_override.CopyFrom(RESPONSE_PHASE)
        return answer

    def _needs_response_phase(self, propagator: Propagator) -> bool:
        """Ask a lean Envoy for the response phase? If something needs the response
        headers, or its access log cannot tell how the exchange ends (no join or stream)."""
        deps, finalizer = self._deps, self._deps.finalizer
        return (self._client is not None or propagator.wants_response
                or (deps.policy is not None and deps.policy.wants_response)
                or deps.response_phase or finalizer is None
                or not finalizer.service.connected)

    def _on_response_headers(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        self._expects_response = True
        headers = request.response_headers
        carrier = carrier_from_headers(headers.headers)
        status = first(carrier, ":status")
        self._status = int(status) if status and status.isdigit() else 0
        if headers.end_of_stream:  # gRPC trailers-only responses carry grpc-status here
            self._grpc_status = first(carrier, "grpc-status") or self._grpc_status
        self._response_attrs = EnvoyAttributes.of(request.attributes,
                                                  self._deps.attributes_namespace)
        self._carrier = carrier
        if self._client is not None:
            self._pending = request  # the upstream span ends after the answer
        span, denied = self.span, self.span is None  # denied before ext_proc saw the request
        if span is None:
            self._start_ns = time.time_ns()
            span = self.span = self._deps.tracer.start_span(
                "HTTP", kind=SpanKind.SERVER, start_time=self._start_ns,
                attributes=dict(self._options.attributes))
        extra = self._propagator.response_headers(span.get_span_context())
        if not extra and not denied:
            return empty_response("response_headers")
        answer = pb.ProcessingResponse()  # filled in place, as the request's answer
        mutation = answer.response_headers.response.header_mutation
        mutation.SetInParent()  # a response_headers answer even when nothing changes
        header_mutation(extra, append=APPENDED, into=mutation)
        if denied:  # its access-log entry must say it was asked: counted here, not there
            trace_metadata(self._deps.metadata_namespace, span.get_span_context(),
                           into=answer.dynamic_metadata)
        return answer

    # -- recording (after the answer is written) --------------------------------

    def record(self) -> None:
        """Attach what the last answered message taught us to the span."""
        request, self._pending = self._pending, None
        span, facts = self.span, self._facts
        if request is None or span is None or facts is None:
            return
        if request.HasField("response_headers"):
            self._end_client()
            return
        carrier, self._carrier = self._carrier or {}, None
        if not self._started:
            self._started = True
            if self._deps.finalizer is not None:  # its entry is ours, even without metadata
                self._deps.finalizer.opened(facts.request_id)
            for observer in self._deps.observers:
                observer.stream_started(facts.method, facts.route)
        if not span.is_recording():
            return
        try:
            envoy = EnvoyAttributes.of(request.attributes, self._deps.attributes_namespace)
            attrs = facts.late_attributes(envoy)
            policy = self._deps.policy
            if policy is not None:
                attrs.update(policy.request_attributes(carrier, first(carrier, ":path") or "",
                                                       envoy, self._tenant))
            elif facts.query is not None:
                attrs[sc.URL_QUERY] = facts.query
            self._path = attrs.get(sc.URL_PATH)
            span.set_attributes(attrs)
            if facts.route is None:
                route = facts.route_template(request.metadata_context,
                                             self._deps.metadata_namespace)
                if route:
                    span.set_attribute(sc.HTTP_ROUTE, route)
                    span.update_name(f"{facts.span_name} {route}")
        except Exception:
            logger.opt(exception=True).error("recording request attributes failed")
            span.set_attribute(sc.URL_PATH, REDACTED)  # never leave the raw path behind

    def _end_client(self) -> None:
        """End the upstream CLIENT span, if any, with what Envoy said of the upstream."""
        client, self._client = self._client, None
        if client is not None:
            end_client(client, self._status, self._grpc_status,
                       bool(self._facts and self._facts.is_grpc), self._response_attrs)

    def close(self) -> None:
        """The stream ended: end the span exactly once (now, or when Envoy's access log
        entry for this exchange arrives, if the sidecar joins them); safe to repeat."""
        if self._closed:
            return
        self._closed = True
        self.record()
        self._end_client()
        if self.span is None:
            return
        end_ns = time.time_ns()
        finalizer = self._deps.finalizer
        request_id = self._facts.request_id if self._facts else None
        if finalizer is not None and request_id:
            finalizer.defer(request_id, lambda final: self._complete(end_ns, final),
                            responded=self._status is not None or self.cancelled
                            or self.abandoned)
        else:
            self._complete(end_ns, None)

    def _complete(self, end_ns: int, final: FinalFacts | None) -> None:
        span = self.span
        if span is None:
            return
        if self._status is None and final is not None:
            # Envoy skipped the response phase (lean envoy.yaml), or the client left
            # before it: the access log has the exact end (start + %DURATION%) and the
            # response, if one was sent.
            if final.duration_ns is not None and self._start_ns:
                end_ns = self._start_ns + final.duration_ns
            if final.response_code:
                self._status = final.response_code
                self._grpc_status = self._grpc_status or final.grpc_status
        error_type: str | None = None
        try:
            error_type = self._finish(span, final)
            if (phases := self._deps.phases) and self._upstream and final is not None:
                phases.record(span, self._upstream, self._facts, (self._start_ns, end_ns), final)
        except Exception:
            logger.opt(exception=True).error("finishing span failed")
        finally:
            span.end(end_time=end_ns)
        if self._deps.observers:
            self._notify(span, end_ns, error_type, final)
        self.span = None
        self._facts = self._response_attrs = self._carrier = None

    def _notify(self, span: Span, end_ns: int, error_type: str | None,
                final: FinalFacts | None) -> None:
        facts = self._facts
        record = ExchangeRecord(
            method=facts.method if facts else None, route=facts.route if facts else None,
            path=self._url_path(), request_id=facts.request_id if facts else None,
            status=self._status, error_type=error_type,
            duration_s=(end_ns - self._start_ns) / 1e9, span_context=span.get_span_context(),
            grpc_status=self._grpc_status, tenant=self._tenant, started=self._started,
            response_body_size=final.body_bytes_sent if final is not None else None,
            route_name=final.route_name if final is not None else None,
            upstream_s=upstream_seconds(final))
        for observer in self._deps.observers:
            try:
                observer.stream_finished(record)
            except Exception:
                logger.opt(exception=True).error("stream observer failed")

    def _url_path(self) -> str | None:
        """url.path for the access line: redacted (matrix parameters, JWTs), as on the span."""
        facts, policy = self._facts, self._deps.policy
        if self._path is None and facts is not None:
            self._path = policy.redactor.path_and_query(facts.path)[0] if policy else facts.path
        return self._path

    def _finish(self, span: Span, final: FinalFacts | None) -> str | None:
        """Final attributes and status; returns the error.type recorded, if any."""
        policy = self._deps.policy
        extra = policy.response_attributes(self._carrier) if self._carrier and policy else {}
        # no response seen, none logged, and none expected (lean) or Envoy went on
        # without our answer: how the exchange ended is unknown
        unknown = self._status is None and final is None and (
            self.abandoned or (not self._expects_response and not self.cancelled))
        result = exchange_outcome(
            self._status, self._grpc_status, bool(self._facts and self._facts.is_grpc),
            self._response_attrs, extra, final, self.cancelled and self._deps.graceful_close,
            unknown=unknown, redactor=policy.redactor if policy else None)
        apply(span, result)
        return result.error_type
