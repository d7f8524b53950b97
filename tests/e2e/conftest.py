"""E2E fixtures: a real Envoy, the sidecar, real upstreams and a real OTLP receiver."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from ext_proc.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.devstack import Stack, add_dead_route

SIDECAR_SERVICE = "extproc-otel"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    rec = OtlpReceiver()
    rec.start()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def stack(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("stack"), receiver.endpoint,
               mutate_config=add_dead_route) as running:
        yield running


def tag() -> str:
    return uuid.uuid4().hex


def gateway_spans(receiver: OtlpReceiver, pred: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
    return [s for s in receiver.spans()
            if s.resource.get("service.name") == SIDECAR_SERVICE and pred(s)]


def wait_gateway_span(receiver: OtlpReceiver, pred: Callable[[ReceivedSpan], bool],
                      timeout: float = 10.0) -> ReceivedSpan:
    """The one gateway span matching `pred` (fails if none arrives in time)."""
    assert receiver.wait_for(lambda: bool(gateway_spans(receiver, pred)), timeout), \
        "no gateway span arrived"
    spans = gateway_spans(receiver, pred)
    return spans[0]


def with_query(tag_value: str) -> Callable[[ReceivedSpan], bool]:
    return lambda s: f"tag={tag_value}" in str(s.attributes.get("url.query", ""))
