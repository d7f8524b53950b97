"""Istio's access log, as its ``envoyHttpAls`` provider makes it, joined behind the lean
Istio filter (issue #19, item 4), on a real Envoy.

No Istio runs here. The Envoy config is the shipped envoy/envoy.yaml with two things
swapped for what Istio builds from `envoy-config --format istio`: the ext_proc filter
of the EnvoyFilter patch (lean, wrapped by the prefilter), and the http_grpc access log
istiod generates for the provider of the mesh config (its own ``outbound|port||host``
cluster for the ServiceEntry, the provider's log name and headers, Istio's default
``filter_state_objects_to_log``, and no buffer settings, so Envoy flushes every 1 s, as
in pilot/pkg/model/telemetry_logging.go ``httpGrpcAccessLogFromTelemetry``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Final

import pytest
import yaml

from ext_proc.config import Settings
from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import ENVOY_YAML, Config, Stack, hcm_of
from ext_proc.envoy_config import EXT_PROC_FILTER, istio_mesh_config, options_for, render, unwrap
from tests.conftest import http_request
from tests.e2e.conftest import (
    add_test_routes,
    assert_outcome,
    gateway_spans,
    tag,
    wait_gateway_span,
    with_query,
)

pytestmark = pytest.mark.e2e

ALS: Final = "envoy.access_loggers.http_grpc"
ALS_TYPE: Final = ("type.googleapis.com/"
                   "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig")


def _istio_filter() -> dict[str, Any]:
    settings = Settings()
    envoy_filter = next(d for d in yaml.safe_load_all(render("istio", settings,
                                                            options_for(settings)))
                        if d and d["kind"] == "EnvoyFilter")
    (value,) = [p["patch"]["value"] for p in envoy_filter["spec"]["configPatches"]
                if p["applyTo"] == "HTTP_FILTER"]
    assert unwrap(value)["processing_mode"]["response_header_mode"] == "SKIP"  # lean
    return dict(value)


def _as_istio_builds_it(config: Config) -> None:
    add_test_routes(config)
    hcm = hcm_of(config)
    hcm["http_filters"] = [_istio_filter() if f["name"] == EXT_PROC_FILTER else f
                           for f in hcm["http_filters"]]
    (provider,) = istio_mesh_config(options_for(Settings()))["extensionProviders"]
    als = provider["envoyHttpAls"]
    cluster_name = f"outbound|{als['port']}||{als['service']}"
    clusters = config["static_resources"]["clusters"]
    (log,) = [a for a in hcm["access_log"] if a["name"] == ALS]
    sidecar_cluster = log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"][
        "cluster_name"]
    (sidecar,) = [c for c in clusters if c["name"] == sidecar_cluster]
    ours = copy.deepcopy(sidecar)  # the ServiceEntry's endpoint is the same sidecar
    ours["name"] = ours["load_assignment"]["cluster_name"] = cluster_name
    clusters.append(ours)
    log["typed_config"] = {
        "@type": ALS_TYPE,
        "common_config": {
            "log_name": als["logName"],
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name,
                                            "authority": als["service"]}},
            "transport_api_version": "V3",
            "filter_state_objects_to_log": ["upstream_peer", "downstream_peer"],
        },
        "additional_request_headers_to_log": als.get("additionalRequestHeadersToLog", []),
        "additional_response_headers_to_log": als.get("additionalResponseHeadersToLog", []),
        "additional_response_trailers_to_log": als.get("additionalResponseTrailersToLog", []),
    }


@pytest.fixture(scope="module")
def istio_like(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Stack, OtlpReceiver]]:
    receiver = OtlpReceiver()
    receiver.start()
    try:
        with Stack(tmp_path_factory.mktemp("istio-als"), receiver.endpoint,
                   envoy_source=ENVOY_YAML, mutate_config=_as_istio_builds_it) as stack:
            yield stack, receiver
    finally:
        receiver.stop()


@pytest.mark.parametrize(("path", "status", "error", "flag"), [
    ("/api/users", 200, None, None),
    ("/no-such-route", 404, None, "NR"),
    ("/down", 503, "upstream_connection_failure", "UF"),
])
def test_lean_istio_filter_joins_istios_access_log(istio_like: tuple[Stack, OtlpReceiver],
                                                   path: str, status: int, error: str | None,
                                                   flag: str | None) -> None:
    """Status, flags and body size come only from the access log (no response phase):
    Istio's entries carry the request id and the sidecar's dynamic metadata."""
    stack, receiver = istio_like
    t = tag()
    reply = http_request(stack.base_url, f"{path}?tag={t}")
    assert reply.status == status
    span = wait_gateway_span(receiver, with_query(t))  # entries come up to 1 s late
    assert_outcome(span, status, error, flag)
    assert span.attributes["http.response.body.size"] == len(reply.body)
    assert len(gateway_spans(receiver, with_query(t))) == 1
    assert stack.envoy_stat("http.ingress.ext_proc.streams_started") >= 1
