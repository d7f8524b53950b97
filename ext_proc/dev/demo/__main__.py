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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from ext_proc._gen.demo.v1 import users_pb2, users_pb2_grpc
from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.dev.demo.tree import parse_log_line, render_traces
from ext_proc.dev.devstack import Proc, Stack

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@dataclass(frozen=True)
class Call:
    label: str
    path: str
    spans: int  # the trace it makes: gateway + the services' spans
    headers: tuple[tuple[str, str], ...] = ()


HTTP_CALLS = (
    Call("list users (new trace)", "/api/users", 3),
    Call("one user, client sent a traceparent", "/api/users/2", 3,
         (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)),
    Call("unknown user (404 from the service)", "/api/users/999", 3),
    Call("no route (404 from Envoy)", "/no/such/route", 1),
    Call("upstream error (503)", "/status/503", 2),
)
GRPC_SPANS = 2  # gateway + the gRPC service
GATEWAY = "extproc-otel"


def _http(stack: Stack, call: Call) -> int:
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    request = Request(stack.url(call.path), headers=dict(call.headers))
    try:
        with urlopen(request, timeout=10) as resp:
            return int(resp.status)
    except HTTPError as exc:
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
        stack = Stack(Path(tmp), endpoint)
        print("starting Envoy, the extproc-otel sidecar and the demo services ...", flush=True)
        with stack:
            print(f"Envoy listening on {stack.base_url}  (admin :{stack.ports.admin})\n")
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
