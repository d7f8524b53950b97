"""The prefilter on a real Envoy: the bootstrap `envoy-config` prints skips the sidecar
exactly for the requests the sampling policy would not sample (issue #18).

Each stack runs that printed bootstrap (ports moved to free ones), the sidecar with the
same config file, and the demo upstream. What Envoy asked is read from its own counter
``http.ingress.ext_proc.streams_started``; roots get a random UUID ``x-request-id``
from Envoy unless a test sends one. Ratios are checked to 4 binomial sigmas.
"""

from __future__ import annotations

import http.client
import json
import math
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from click.testing import CliRunner

from ext_proc.cli import main
from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import (
    Proc,
    envoy_binary,
    envoy_stat,
    free_port,
    grpc_serving,
    http_ok,
    wait_until,
)
from ext_proc.envoy_config import EXT_PROC_FILTER, PREFILTER_METADATA, unwrap
from ext_proc.envoy_config.prefilter import MATCH_DELEGATE_TYPE
from tests.e2e.conftest import bootstrap_on_free_ports

pytestmark = pytest.mark.e2e

ASKED: Final = "http.ingress.ext_proc.streams_started"
UNSAMPLED: Final = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
SAMPLED: Final = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CLIENTS: Final = 8
# default 0.01; a path rule at 0.1, a hotter one at 0.5; tenant gold (header) always
MAIN: Final = {
    "sampling": {"ratio": 0.01,
                 "rules": [{"name": "tenth", "path_prefix": "/echo/tenth", "ratio": 0.1},
                           {"name": "hot", "path_prefix": "/echo/hot", "ratio": 0.5}],
                 "tenants": {"gold": {"ratio": 1.0}}},
    "tenants": {"header": "x-tenant"},
}
# the tenant comes from a JWT claim, which Envoy cannot read: gold's 0.5 is merged
JWT: Final = {"sampling": {"ratio": 0.01, "tenants": {"gold": {"ratio": 0.5}}},
              "tenants": {"jwt_claim": "tenant"}}


class PrefilterStack:
    """Envoy (the printed bootstrap) + sidecar (same config file) + the demo upstream."""

    def __init__(self, workdir: Path, config: Mapping[str, Any],
                 otlp_endpoint: str | None = None) -> None:
        self.sidecar_port, users = free_port(), free_port()
        self.admin_port = free_port()  # the sidecar's /metrics
        config_file = workdir / "extproc.yaml"
        config_file.write_text(yaml.safe_dump(dict(config)))
        result = CliRunner().invoke(main, [
            "envoy-config", "--format", "bootstrap", "--config", str(config_file),
            "--sidecar-address", f"127.0.0.1:{self.sidecar_port}"])
        assert result.exit_code == 0, result.output
        self.printed = result.output
        bootstrap, self.listener, self.admin = bootstrap_on_free_ports(
            yaml.safe_load(result.output), users)
        (workdir / "envoy.yaml").write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
               "OTEL_LOGS_EXPORTER": "none"}
        sidecar_env = env if otlp_endpoint is None else {
            **env, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRICS_EXPORTER": "prometheus",
            "EXTPROC_ADMIN__LISTEN": f"127.0.0.1:{self.admin_port}"}
        py = sys.executable
        self.procs = [
            Proc("users", [py, "-m", "ext_proc.dev.demo.users_service", "--listen",
                           f"127.0.0.1:{users}", "--db", str(workdir / "users.db")],
                 workdir / "users.log", env),
            Proc("sidecar", [py, "-m", "ext_proc", "serve", "--config", str(config_file),
                             "--listen", f"127.0.0.1:{self.sidecar_port}"],
                 workdir / "sidecar.log", sidecar_env),
            Proc("envoy", [envoy_binary(), "-c", str(workdir / "envoy.yaml"),
                           "--disable-hot-restart", "--log-level", "warn", "--concurrency", "2"],
                 workdir / "envoy.log"),
        ]
        self._users = users

    def __enter__(self) -> PrefilterStack:
        for proc in self.procs:
            proc.start()
        try:
            wait_until(lambda: self._alive() and http_ok(
                f"http://127.0.0.1:{self._users}/healthz"), 30, "users")
            wait_until(lambda: self._alive() and grpc_serving(
                f"127.0.0.1:{self.sidecar_port}"), 30, "the sidecar")
            wait_until(lambda: self._alive() and http_ok(
                f"http://127.0.0.1:{self.admin}/ready"), 30, "envoy")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def _alive(self) -> bool:
        for proc in self.procs:
            assert proc.alive(), f"{proc.name} exited:\n{proc.output()[-3000:]}"
        return True

    def asked(self) -> int:
        return envoy_stat(self.admin, ASKED)

    def count_asked(self, n: int, path: str, headers: Mapping[str, str] | None = None) -> int:
        """How many of `n` GETs of `path` (from CLIENTS keep-alive connections) Envoy asked
        the sidecar about."""
        before = self.asked()
        # any status: the demo upstream may drop a keep-alive connection now and then
        # (503 UC), which says nothing of whether Envoy asked
        send(self.listener, n, path, headers or {}, any_status=True)
        return self.asked() - before

    def echo(self, headers: Mapping[str, str]) -> dict[str, list[str]]:
        """The headers (name -> values) the upstream received for one GET /echo."""
        conn = http.client.HTTPConnection("127.0.0.1", self.listener, timeout=10)
        try:
            conn.request("GET", "/echo", headers=dict(headers))
            resp = conn.getresponse()
            assert resp.status == 200
            received: dict[str, list[str]] = json.loads(resp.read())["headers"]
        finally:
            conn.close()
        return {k.lower(): v for k, v in received.items()}


def send(port: int, n: int, path: str, headers: Mapping[str, str], *,
         any_status: bool = False) -> None:
    """`n` GETs to 127.0.0.1:`port`, bounded, over CLIENTS keep-alive connections (each
    must answer 200 unless `any_status`)."""
    lock, errors = threading.Lock(), list[object]()
    left = [n]

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                conn.request("GET", path, headers=dict(headers))
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200 and not any_status:
                    with lock:
                        errors.append(resp.status)
        except (OSError, http.client.HTTPException) as exc:
            with lock:
                errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:5]
    assert left == [0]


def assert_binomial(asked: int, n: int, ratio: float) -> None:
    """`asked` of `n` is within 4 sigmas of n * ratio (the prefilter's precision is 1/4096,
    and thresholds round up: ratio here is ceil(ratio * 4096) / 4096)."""
    p = math.ceil(ratio * 4096 - 1e-9) / 4096
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(asked - n * p) <= 4 * sigma, (asked, n, p)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory,
          receiver: OtlpReceiver) -> Iterator[PrefilterStack]:
    with PrefilterStack(tmp_path_factory.mktemp("prefilter"), MAIN,
                        receiver.endpoint) as running:
        yield running


def _requests_counted(stack: PrefilterStack, route: str) -> float:
    """The sidecar's request count (every status, method) of `route` on its /metrics."""
    url = f"http://127.0.0.1:{stack.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("http_server_request_duration_seconds_count{")
               and f'http_route="{route}"' in line)


def test_every_request_is_counted_and_every_asked_root_recorded(
        stack: PrefilterStack, receiver: OtlpReceiver) -> None:
    """Roots at 1 %: Envoy asks about ~1 %, the sidecar records each of those (its
    decision is Envoy's), and its metrics count all of them, asked or not."""
    n, t = 1000, uuid.uuid4().hex
    before, asked_before = _requests_counted(stack, "_OTHER"), stack.asked()
    # any status: the demo upstream may drop a keep-alive connection (503), counted too
    send(stack.listener, n, f"/echo/counted?tag={t}", {}, any_status=True)
    asked = stack.asked() - asked_before
    assert_binomial(asked, n, 0.01)

    def recorded() -> int:
        return sum(1 for span in receiver.spans()
                   if f"tag={t}" in str(span.attributes.get("url.query", "")))
    wait_until(lambda: _requests_counted(stack, "_OTHER") - before >= n
               and recorded() >= asked, 15, "every request counted, every asked one recorded")
    assert _requests_counted(stack, "_OTHER") - before == n
    assert recorded() == asked


def test_the_printed_bootstrap_wraps_the_filter(stack: PrefilterStack) -> None:
    config = yaml.safe_load(stack.printed)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    (flt,) = [f for f in hcm["http_filters"] if f["name"] == EXT_PROC_FILTER]
    assert flt["typed_config"]["@type"] == MATCH_DELEGATE_TYPE
    assert stack.printed.startswith("# extproc-otel prefilter ")
    # the composite filter builds ext_proc only for the requests no matcher skips
    composite = flt["typed_config"]["extension_config"]
    assert composite["typed_config"]["@type"].endswith("composite.v3.Composite")
    inner = unwrap(flt)
    assert inner["@type"].endswith("ext_proc.v3.ExternalProcessor")
    (meta,) = inner["grpc_service"]["initial_metadata"]
    assert meta["key"] == PREFILTER_METADATA


def test_an_unsampled_parent_is_never_asked_and_passes_unchanged(stack: PrefilterStack) -> None:
    assert stack.count_asked(50, "/echo", {"traceparent": UNSAMPLED}) == 0
    before = stack.asked()
    received = stack.echo({"traceparent": UNSAMPLED, "tracestate": "k=v"})
    assert stack.asked() == before
    assert received["traceparent"] == [UNSAMPLED]
    assert received["tracestate"] == ["k=v"]


def test_a_sampled_parent_is_asked(stack: PrefilterStack) -> None:
    assert stack.count_asked(50, "/echo", {"traceparent": SAMPLED}) == 50
    received = stack.echo({"traceparent": SAMPLED})
    # the sidecar answered: the upstream's parent is the gateway span, same trace
    (injected,) = received["traceparent"]
    assert injected.split("-")[1] == SAMPLED.split("-")[1]
    assert injected != SAMPLED


def test_an_unsampled_parent_beside_another_context_header_is_asked(
        stack: PrefilterStack) -> None:
    """Two formats present: the sidecar decides which one wins, so Envoy asks."""
    b3 = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"
    assert stack.count_asked(20, "/echo", {"traceparent": UNSAMPLED, "b3": b3}) == 20


@pytest.mark.parametrize("path, ratio", [("/echo", 0.01), ("/echo/tenth", 0.1),
                                         ("/echo/hot", 0.5)])
def test_roots_are_asked_at_their_ratio(stack: PrefilterStack, path: str, ratio: float) -> None:
    n = {0.01: 4000, 0.1: 2000, 0.5: 400}[ratio]
    assert_binomial(stack.count_asked(n, path), n, ratio)


def test_a_header_tenant_ratio_is_honoured(stack: PrefilterStack) -> None:
    assert stack.count_asked(200, "/echo", {"x-tenant": "gold"}) == 200
    assert_binomial(stack.count_asked(2000, "/echo", {"x-tenant": "lead"}), 2000, 0.01)


def test_the_bucket_edges_on_envoys_regex(stack: PrefilterStack) -> None:
    """0.1 -> threshold 410 (0x19a) on /echo/tenth: 0x199 asked, 0x19a and up skipped, any case;
    an id that does not start with three hex digits is always asked."""
    asked = {rid: stack.count_asked(1, "/echo/tenth", {"x-request-id": rid}) for rid in (
        "199f0000-0000-4000-8000-000000000000", "19a00000-0000-4000-8000-000000000000",
        "19A00000-0000-4000-8000-000000000000", "fff00000-0000-4000-8000-000000000000",
        "00000000-0000-4000-8000-000000000000", "zzz", "1")}
    assert asked == {"199f0000-0000-4000-8000-000000000000": 1,
                     "19a00000-0000-4000-8000-000000000000": 0,
                     "19A00000-0000-4000-8000-000000000000": 0,
                     "fff00000-0000-4000-8000-000000000000": 0,
                     "00000000-0000-4000-8000-000000000000": 1, "zzz": 1, "1": 1}


def test_a_route_that_turns_the_sidecar_off_still_does(stack: PrefilterStack) -> None:
    """The per-route config keyed by the filter's name reaches the wrapped filter."""
    assert stack.count_asked(20, "/healthz", {"x-tenant": "gold"}) == 0


def test_a_jwt_claim_tenant_falls_back_to_asking(tmp_path: Path) -> None:
    with PrefilterStack(tmp_path, JWT) as jwt:
        assert_binomial(jwt.count_asked(800, "/echo"), 800, 0.5)


@pytest.mark.parametrize("sampling", [{"ratio": 0.01, "keep_errors": {"enabled": True}},
                                      {"ratio": 0.01, "prefilter": False}],
                         ids=["keep_errors", "prefilter_off"])
def test_the_bare_filter_asks_about_every_request(tmp_path: Path,
                                                  sampling: dict[str, Any]) -> None:
    with PrefilterStack(tmp_path, {"sampling": sampling}) as bare:
        assert bare.printed.startswith("# extproc-otel prefilter off: ")
        assert MATCH_DELEGATE_TYPE not in bare.printed
        assert PREFILTER_METADATA not in bare.printed
        assert bare.count_asked(200, "/echo") == 200
        assert bare.count_asked(50, "/echo", {"traceparent": UNSAMPLED}) == 50
