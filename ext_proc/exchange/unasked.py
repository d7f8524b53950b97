"""Requests Envoy did not ask the sidecar about, counted from its access log.

With the prefilter (or ``ExtProcPerRoute.disabled``) Envoy opens no ext_proc stream
for most requests, yet its gRPC access log still sends the sidecar an entry for every
one. The sidecar's answer to an asked request sets dynamic metadata in its namespace
(`answers.trace_metadata`), and Envoy logs dynamic metadata in
``common_properties.metadata``: an entry without our namespace, whose request id no
exchange waits for, is a request the sidecar was not asked about (or whose answer
Envoy dropped while no exchange of ours knew it). Such a request gets the RED metrics
and an access line through the observers, with no span and so no exemplar.

Cheap on purpose: no span, no timer, no join bookkeeping; the entries of one ALS
message are decoded and handed to the observers together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from loguru import logger
from opentelemetry.trace import INVALID_SPAN_CONTEXT

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc.exchange.als import response_flag_codes, response_of
from ext_proc.exchange.outcome import GRPC_CODE_NAMES, GRPC_SERVER_ERRORS, RESET_FLAGS, grpc_code
from ext_proc.exchange.timings import upstream_seconds
from ext_proc.request.envoy_attrs import FLAG_ERROR_TYPES
from ext_proc.request.seams import Bounded, ExchangeRecord, StreamObserver
from ext_proc.telemetry import semconv as sc

# envoy.config.core.v3.RequestMethod, by number; METHOD_UNSPECIFIED is any other method.
METHODS: Final = (sc.OTHER_METHOD, "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT",
                  "OPTIONS", "TRACE", "PATCH")

PathRedactor = Callable[[str], str]  # Envoy's :path -> url.path, redacted, no query
TenantOf = Callable[[Mapping[str, list[str]]], "str | None"]


def error_type(status: int | None, grpc_status: str | None,
               flags: Sequence[str]) -> str | None:
    """`error.type` as `outcome.exchange_outcome` names it from an access-log entry alone
    (no response: client_aborted; a gRPC server error by code name; 5xx by the flag's
    cause or the code; a reset after a <500 response: response_incomplete)."""
    if status is None:
        return sc.ERROR_CLIENT_ABORTED
    code = grpc_code(grpc_status)
    if code is not None and code in GRPC_SERVER_ERRORS:
        return GRPC_CODE_NAMES[code] if code < len(GRPC_CODE_NAMES) else str(code)
    if status >= 500:
        return next((FLAG_ERROR_TYPES[f] for f in flags if f in FLAG_ERROR_TYPES), str(status))
    if RESET_FLAGS.intersection(flags):
        return sc.ERROR_RESPONSE_INCOMPLETE
    return None


class CachedPaths:
    """`redact` (raw ``:path`` -> redacted url.path) remembered by the part before ``?``:
    a route's un-asked requests repeat their paths, and the query (which may carry
    tokens) is never a key. Long paths are redacted each time (they may be cut)."""

    def __init__(self, redact: PathRedactor, size: int = 4096, longest: int = 1024) -> None:
        self._redact, self._size, self._longest = redact, size, longest
        self._seen: dict[str, str] = {}

    def __call__(self, raw: str) -> str:
        key = raw.partition("?")[0]
        if len(key) > self._longest:
            return self._redact(raw)
        seen = self._seen
        found = seen.get(key)
        if found is None:
            if len(seen) >= self._size:
                seen.clear()
            found = seen[key] = self._redact(key)
        return found

    def bounded(self) -> tuple[Bounded, ...]:
        return (Bounded("unasked.paths", self._seen.__len__, self._size),)



class RouteTemplates:
    """Envoy route name -> http.route template, learnt from asked exchanges (an observer).

    The template arrives with the ext_proc stream (route metadata), which an un-asked
    request never opens; its access-log entry still names Envoy's route, so the metrics
    of the unasked requests of a route group with its asked ones, not under _OTHER."""

    MAX_ROUTES: Final = 1024

    def __init__(self) -> None:
        self._templates: dict[str, str] = {}

    def get(self, route_name: str) -> str | None:
        return self._templates.get(route_name) if route_name else None

    def bounded(self) -> tuple[Bounded, ...]:
        return (Bounded("unasked.routes", self._templates.__len__, self.MAX_ROUTES),)

    def stream_started(self, method: str | None, route: str | None) -> None:
        return

    def stream_finished(self, record: ExchangeRecord) -> None:
        name, route = record.route_name, record.route
        if name and route and self._templates.get(name) != route \
                and (name in self._templates or len(self._templates) < self.MAX_ROUTES):
            self._templates[name] = route


class UnaskedRequests:
    """Hands `ExchangeRecord`s of un-asked requests to the observers, a batch at a time.

    `path` redacts Envoy's ``:path`` for the access line (without it the path is cut at
    ``?`` only); `tenant` resolves a tenant from the request headers Envoy logged
    (``additional_request_headers_to_log``), when there are any."""

    def __init__(self, observers: Iterable[StreamObserver], *,
                 path: PathRedactor | None = None, tenant: TenantOf | None = None,
                 routes: RouteTemplates | None = None) -> None:
        self._observers = tuple(observers)
        self._routes = routes
        self._path = path
        self._tenant = tenant
        self.counted = 0  # requests handed to the observers

    def record(self, entry: log_pb.HTTPAccessLogEntry) -> ExchangeRecord:
        """The record of one final entry (the caller checked it is final and un-asked)."""
        request, common = entry.request, entry.common_properties
        status, body, _, grpc_status = response_of(entry)
        if common.HasField("time_to_last_downstream_tx_byte"):
            elapsed = common.time_to_last_downstream_tx_byte
            duration_s = elapsed.seconds + elapsed.nanos / 1e9
        elif common.HasField("duration"):
            duration_s = common.duration.seconds + common.duration.nanos / 1e9
        else:
            duration_s = 0.0
        flags = (response_flag_codes(common.response_flags)
                 if common.HasField("response_flags") else ())
        number = request.request_method
        raw_path = request.original_path or request.path  # as the client sent it
        tenant: str | None = None
        if self._tenant is not None and request.request_headers:
            tenant = self._tenant({k: [v] for k, v in request.request_headers.items()})
        return ExchangeRecord(
            method=METHODS[number] if 0 <= number < len(METHODS) else sc.OTHER_METHOD,
            # the template comes with the ext_proc stream: learnt from the route's asked ones
            route=self._routes.get(common.route_name) if self._routes is not None else None,
            route_name=common.route_name or None,
            status=status,
            error_type=error_type(status, grpc_status, flags),
            duration_s=duration_s,
            span_context=INVALID_SPAN_CONTEXT,  # no span: no trace ids, no exemplar
            grpc_status=grpc_status,
            tenant=tenant,
            started=False,
            path=(self._path(raw_path) if self._path is not None
                  else raw_path.partition("?")[0]) if raw_path else None,
            request_id=request.request_id or None,
            response_body_size=body,
            upstream_s=upstream_seconds(common),
        )

    def handle(self, entries: Sequence[log_pb.HTTPAccessLogEntry]) -> None:
        """Count the un-asked entries of one ALS message. Never raises."""
        records: list[ExchangeRecord] = []
        for entry in entries:
            try:
                records.append(self.record(entry))
            except Exception:  # one bad entry must not cost the rest of the batch
                logger.opt(exception=True).warning("access log entry unreadable")
        self.counted += len(records)
        for observer in self._observers:
            many = getattr(observer, "streams_finished", None)
            if many is not None:  # the batch at once (RED metrics, access lines)
                try:
                    many(records)
                except Exception:
                    logger.opt(exception=True).error("stream observer failed")
                continue
            finished = observer.stream_finished
            for record in records:
                try:
                    finished(record)
                except Exception:
                    logger.opt(exception=True).error("stream observer failed")
