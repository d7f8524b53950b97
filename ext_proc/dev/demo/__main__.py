"""``make demo``: Envoy + sidecar + demo upstreams on loopback, traced end to end.

Starts the stack of `ext_proc.dev.devstack` (no Docker), sends a few HTTP and gRPC
requests (with and without an incoming traceparent), then prints every trace
as a tree next to the correlated log lines of the gateway and the services.
Spans go to an embedded OTLP receiver, or to ``OTEL_EXPORTER_OTLP_ENDPOINT``
when that is set. Stops by itself unless ``--keep-running``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

import grpc

from ext_proc._gen.demo.v1 import users_pb2, users_pb2_grpc
from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.dev.demo.tree import parse_log_line, render_traces
from ext_proc.dev.devstack import Config, Proc, Stack, hcm_of, wait_until

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
DELAY_MS = 100  # Envoy's fault filter holds requests to DELAYED_PATH this long
DELAYED_PATH = "/delayed/users"


@dataclass(frozen=True)
class Call:
    label: str
    path: str
    spans: int  # the trace it makes: gateway + the services' spans
    headers: tuple[tuple[str, str], ...] = ()


# Phase spans are on (stream.phase_spans): a gateway span has a child per phase Envoy
# went through: filters, upstream (CLIENT), response. A local reply has only a response.
PHASES = 3
HTTP_CALLS = (
    Call("list users (new trace)", "/api/users", 3 + PHASES),
    Call("one user, client sent a traceparent", "/api/users/2", 3 + PHASES,
         (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)),
    Call(f"through a slow filter (fault delay {DELAY_MS} ms: see filters)", DELAYED_PATH,
         3 + PHASES),
    Call("unknown user (404 from the service)", "/api/users/999", 3 + PHASES),
    Call("no route (404 from Envoy)", "/no/such/route", 1 + 1),
    Call("upstream error (503)", "/status/503", 2 + PHASES),
)
GRPC_SPANS = 2 + PHASES  # gateway + the gRPC service
GATEWAY = "extproc-otel"
SIDECAR_ENV = {"EXTPROC_STREAM__PHASE_SPANS": "true"}
FAULT: Final = "envoy.filters.http.fault"
FAULT_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
WARMUP_PATH: Final = "/warmup"


def demo_routes(config: Config) -> None:
    """envoy.yaml plus Envoy's fault filter after ext_proc, delaying one route
    (`DELAYED_PATH`), and an untraced route for the warm-up."""
    hcm = hcm_of(config)
    filters = hcm["http_filters"]
    filters.insert(len(filters) - 1, {"name": FAULT, "typed_config": {"@type": FAULT_TYPE}})
    delay = {"@type": FAULT_TYPE, "delay": {"fixed_delay": f"{DELAY_MS / 1000}s",
                                            "percentage": {"numerator": 100}}}
    per_route = {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                 "ExtProcPerRoute"}
    hcm["route_config"]["virtual_hosts"][0]["routes"][:0] = [
        {"name": "delayed_users", "match": {"path": DELAYED_PATH},
         "route": {"cluster": "users", "prefix_rewrite": "/api/users"},
         "typed_per_filter_config": {FAULT: delay, "envoy.filters.http.ext_proc": {
             **per_route, "overrides": {"grpc_initial_metadata": [
                 {"key": "x-extproc-otel-http-route", "value": DELAYED_PATH}]}}}},
        {"name": "warmup", "match": {"path": WARMUP_PATH},
         "route": {"cluster": "users", "prefix_rewrite": "/healthz"},
         "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
             **per_route, "disabled": True}}},
    ]


def _warm_up(stack: Stack) -> None:
    """Phase spans come from Envoy's access log, whose stream Envoy opens with its first
    entry: send an untraced request and wait for the sidecar to have read its entry."""
    request_id = str(uuid.uuid4())
    _http(stack, Call("warm-up", WARMUP_PATH, 0, (("x-request-id", request_id),)))
    wait_until(lambda: any(line.get("request_id") == request_id
                           for line in stack.sidecar_lines()), 15, "Envoy's access log")


def _http(stack: Stack, call: Call) -> int:
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    request = Request(stack.url(call.path), headers=dict(call.headers))
    try:
        with urlopen(request, timeout=10) as resp:
            resp.read()  # the whole response: leaving early is a client abort to Envoy
            return int(resp.status)
    except HTTPError as exc:
        exc.read()
        return exc.code


def _grpc(stack: Stack) -> str:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = users_pb2_grpc.UsersStub(channel)
        user = stub.GetUser(users_pb2.GetUserRequest(id=1), timeout=10)
        return f"OK ({user.name})"


def _log_lines(procs: list[Proc]) -> list[dict[str, Any]]:
    lines = []
    for proc in procs:
        for raw in proc.output().splitlines():
            parsed = parse_log_line(raw)
            if parsed is not None and parsed.get("trace_id"):
                parsed.setdefault("service", "gateway" if proc.name == "sidecar" else proc.name)
                lines.append(parsed)
    return lines


def _traced_spans(receiver: OtlpReceiver) -> list[ReceivedSpan]:
    """Spans of the traces that went through the gateway (not readiness probes)."""
    traced = {s.trace_id for s in receiver.spans() if s.resource.get("service.name") == GATEWAY}
    return [s for s in receiver.spans() if s.trace_id in traced]


def _show(stack: Stack, receiver: OtlpReceiver, shown: set[str]) -> set[str]:
    """Print the traces not shown yet; returns every trace id shown so far."""
    spans = [s for s in _traced_spans(receiver) if s.trace_id not in shown]
    if spans:
        logs = _log_lines([stack.sidecar, stack.users, stack.grpc_demo])
        print("\n" + render_traces(spans, logs, color=sys.stdout.isatty()))
    return shown | {s.trace_id for s in spans}


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP stop the stack like Ctrl-C does


def run(keep_running: bool) -> int:
    external = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    receiver = None if external else OtlpReceiver()
    endpoint = external or ""
    if receiver is not None:
        receiver.start()
        endpoint = receiver.endpoint
    with tempfile.TemporaryDirectory(prefix="extproc-demo-") as tmp:
        stack = Stack(Path(tmp), endpoint, mutate_config=demo_routes, sidecar_env=SIDECAR_ENV)
        print("starting Envoy, the extproc-otel sidecar and the demo services ...", flush=True)
        with stack:
            print(f"Envoy listening on {stack.base_url}  (admin :{stack.ports.admin})\n")
            _warm_up(stack)
            for call in HTTP_CALLS:
                print(f"  GET {call.path:<18} {_http(stack, call)}  {call.label}")
            print(f"  gRPC demo.v1.Users/GetUser  {_grpc(stack)}")
            if receiver is None:
                print(f"\nspans exported to {external}; open your trace backend to see them.")
            else:
                expected = sum(call.spans for call in HTTP_CALLS) + GRPC_SPANS
                receiver.wait_for(lambda: len(_traced_spans(receiver)) >= expected, 15)
                shown = _show(stack, receiver, set())
            if keep_running:
                print(f"\nrunning; try: curl {stack.url('/api/users')}   (Ctrl-C to stop; "
                      "the traces of your requests are printed then)")
                try:
                    threading.Event().wait()
                except KeyboardInterrupt:
                    if receiver is not None:
                        _show(stack, receiver, shown)
        print("stopped cleanly.")
    if receiver is not None:
        receiver.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n")[0])
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the stack up after the demo requests (Ctrl-C stops it)")
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    return run(args.keep_running)


if __name__ == "__main__":
    raise SystemExit(main())
