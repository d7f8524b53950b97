"""Shared parts of the reliability e2e tests (issue #8): a stack with an observed sidecar.

Every request a test sends carries ``tag=<uuid>&n=<seq>`` in its query, so the
gateway span of request ``n`` is found by its ``url.query``.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.dev.devstack import Config, Stack, free_port, hcm_of
from ext_proc.dev.soak import SidecarProbe, observed_stack
from tests.e2e.conftest import gateway_spans, tag

TRACEPARENT_IN_BODY: Final = b'"traceparent"'  # the echo upstream lists what it received
MESSAGE_TIMEOUTS: Final = "http.ingress.ext_proc.message_timeouts"
FAILURE_ALLOWED: Final = "http.ingress.ext_proc.failure_mode_allowed"
STREAMS_FAILED: Final = "http.ingress.ext_proc.streams_failed"
_SEQ_RE: Final = re.compile(r"(?:^|&)n=(\d+)(?:&|$)")
FIGURES_ENV: Final = "RELIABILITY_FIGURES"  # a file to append measured figures to


@dataclass
class Rig:
    stack: Stack
    receiver: OtlpReceiver
    admin_port: int
    tag: str

    @property
    def pid(self) -> int:
        assert self.stack.sidecar.popen is not None
        return self.stack.sidecar.popen.pid

    @property
    def probe(self) -> SidecarProbe:
        return SidecarProbe(self.admin_port, self.pid)

    def url(self, path: str = "/echo", tag_value: str | None = None) -> str:
        """`path` with a tag (default: this rig's) and the loadgen's sequence placeholder."""
        return self.stack.url(f"{path}?tag={tag_value or self.tag}&n={{n}}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.stack.sidecar.popen is not None
        self.stack.sidecar.popen.send_signal(sig)

    def spans(self, tag_value: str | None = None,
              receiver: OtlpReceiver | None = None) -> dict[int, ReceivedSpan]:
        """The gateway spans of requests tagged `tag_value` (default: this rig's tag) at
        `receiver` (default: the rig's), by sequence number."""
        wanted = f"tag={tag_value or self.tag}&"
        out: dict[int, ReceivedSpan] = {}
        for span in gateway_spans(receiver or self.receiver, lambda s: wanted in str(
                s.attributes.get("url.query", ""))):
            seq = seq_of(span)
            if seq is not None:
                out[seq] = span
        return out

    def envoy_stats(self, *names: str) -> dict[str, int]:
        return {name: self.stack.envoy_stat(name) for name in names}


def seq_of(span: ReceivedSpan) -> int | None:
    match = _SEQ_RE.search(str(span.attributes.get("url.query", "")))
    return int(match.group(1)) if match else None


@contextmanager
def rig(workdir: Path, *, sidecar_env: Mapping[str, str] | None = None,
        mutate_config: Callable[[Config], None] | None = None,
        receiver: OtlpReceiver | None = None) -> Iterator[Rig]:
    """A started stack whose sidecar has an admin endpoint, exporting to `receiver`
    (a fresh one unless given; a given one is not stopped here)."""
    own = receiver is None
    rx = receiver or OtlpReceiver()
    if own:
        rx.start()
    admin_port = free_port()
    stack = observed_stack(workdir, rx.endpoint, admin_port, sidecar_env=sidecar_env,
                           mutate_config=mutate_config)
    try:
        stack.start()
        yield Rig(stack, rx, admin_port, tag())
    finally:
        stack.stop()
        if own:
            rx.stop()


def deltas(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


def record(scenario: str, **figures: object) -> None:
    """Print the measured figures (and append them to $RELIABILITY_FIGURES when set)."""
    line = json.dumps({"scenario": scenario, **figures}, default=str)
    print(f"RELIABILITY {line}")
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def direct_route(config: Config) -> None:
    """``/direct``: Envoy answers 200 itself (the ext_proc filter still runs both phases),
    so only Envoy and the sidecar carry the load."""
    routes = hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {"name": "direct", "match": {"prefix": "/direct"},
                      "direct_response": {"status": 200, "body": {"inline_string": "ok"}}})
