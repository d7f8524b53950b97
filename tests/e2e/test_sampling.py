"""Issue #5 on a real running sidecar behind Envoy: rules, tenants, budgets, live reload."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import Stack, free_port, wait_until
from tests.conftest import http_request
from tests.e2e.conftest import tag, wait_gateway_span, with_query

pytestmark = pytest.mark.e2e

RULES = {
    "rules": [
        {"name": "health", "path_prefix": "/echo/health", "ratio": 0.0},
        {"name": "checkout", "path_prefix": "/echo/checkout", "ratio": 1.0},
    ],
    "tenants": {"noisy": {"ratio": 1.0, "budget": {"traces_per_second": 2, "burst": 3}}},
}


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, OtlpReceiver,
                                                                          Path, int]]:
    workdir = tmp_path_factory.mktemp("sampling")
    rules = workdir / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    admin = free_port()
    receiver = OtlpReceiver()
    receiver.start()
    env = {"EXTPROC_SAMPLING__RULES_FILE": str(rules),
           "EXTPROC_SAMPLING__RELOAD_INTERVAL_S": "0.1",
           "EXTPROC_TENANTS__HEADER": "x-tenant",
           "EXTPROC_METRICS__TENANT_ATTRIBUTE": "true",
           "EXTPROC_ADMIN__LISTEN": f"127.0.0.1:{admin}"}
    stack = Stack(workdir, receiver.endpoint, sidecar_env=env)
    try:
        stack.start()
        yield stack, receiver, rules, admin
    finally:
        stack.stop()
        receiver.stop()


def _sampled(stack: Stack, path: str, headers: list[tuple[str, str]] | None = None) -> bool:
    reply = http_request(stack.base_url, path, headers=headers)
    (traceparent,) = reply.json()["headers"]["traceparent"]
    return bool(int(traceparent.split("-")[3], 16) & 1)


def _log_count(stack: Stack, msg: str) -> int:
    return sum(1 for line in stack.sidecar_lines() if line.get("msg") == msg)


def test_rules_pick_the_ratio(sampled: tuple[Stack, OtlpReceiver, Path, int]) -> None:
    stack, *_ = sampled
    assert not any(_sampled(stack, "/echo/health") for _ in range(10))
    assert all(_sampled(stack, "/echo/checkout") for _ in range(10))


def test_tenant_is_recorded_everywhere(sampled: tuple[Stack, OtlpReceiver, Path, int]) -> None:
    stack, receiver, _, admin = sampled
    t = tag()
    http_request(stack.base_url, f"/echo/checkout?tag={t}", headers=[("x-tenant", "acme")])
    span = wait_gateway_span(receiver, with_query(t))
    assert span.attributes["tenant.id"] == "acme"
    def access() -> list[dict[str, object]]:
        return [line for line in stack.sidecar_lines()
                if line.get("msg") == "access" and line.get("trace_id") == span.trace_id]
    wait_until(lambda: bool(access()), 5, "the sidecar's access line")
    assert access()[0]["tenant"] == "acme"
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
        assert 'tenant_id="acme"' in resp.read().decode()


def test_tenant_budget_caps_a_burst(sampled: tuple[Stack, OtlpReceiver, Path, int]) -> None:
    stack, *_ = sampled
    results = [_sampled(stack, "/echo/checkout", [("x-tenant", "noisy")]) for _ in range(30)]
    # burst 3 plus 2/s refill over the (short) burst: far below 30
    assert 1 <= sum(results) <= 3 + 2 * 5
    # another tenant is not affected by the noisy one's empty bucket
    assert all(_sampled(stack, "/echo/checkout", [("x-tenant", "quiet")]) for _ in range(5))


def test_live_reload_valid_then_invalid(sampled: tuple[Stack, OtlpReceiver, Path, int]) -> None:
    stack, _, rules, admin = sampled
    assert not _sampled(stack, "/echo/health")
    reloads = _log_count(stack, "sampling rules reloaded")
    changed = {**RULES, "rules": [{"name": "health", "path_prefix": "/echo/health",
                                   "ratio": 1.0}]}
    rules.write_text(yaml.safe_dump(changed))
    wait_until(lambda: _log_count(stack, "sampling rules reloaded") > reloads, 10,
               "the rules to reload")
    assert all(_sampled(stack, "/echo/health") for _ in range(5))
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config", timeout=5) as resp:
        active = json.load(resp)["sampling_active"]
    assert [r["name"] for r in active["rules"]] == ["health"]

    rejected = _log_count(stack, "sampling rules rejected, keeping previous rules")
    rules.write_text("rules: [{ratio: 7}]\n")  # invalid: ratio above 1
    wait_until(lambda: _log_count(
        stack, "sampling rules rejected, keeping previous rules") > rejected, 10,
        "the bad file to be rejected")
    assert all(_sampled(stack, "/echo/health") for _ in range(5))  # previous rules kept
    rules.write_text(yaml.safe_dump(RULES))
    wait_until(lambda: _log_count(stack, "sampling rules reloaded") > reloads + 1, 10,
               "the original rules to come back")
    assert not _sampled(stack, "/echo/health")


def test_keep_errors_exports_failed_spans_of_unsampled_traces(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    receiver.start()
    env = {"EXTPROC_SAMPLING__RATIO": "0", "EXTPROC_SAMPLING__KEEP_ERRORS__ENABLED": "true"}
    try:
        with Stack(tmp_path, receiver.endpoint, sidecar_env=env) as stack:
            ok, failed = tag(), tag()
            reply = http_request(stack.base_url, f"/echo?tag={ok}")
            (traceparent,) = reply.json()["headers"]["traceparent"]
            assert int(traceparent.split("-")[3], 16) & 1 == 0  # head decision: not sampled
            assert http_request(stack.base_url, f"/status/503?tag={failed}").status == 503
            span = wait_gateway_span(receiver, with_query(failed))
            assert span.attributes["extproc.sampling.kept"] in {"status", "error"}
            # the kept span was exported after the unsampled success, which was not
            assert not [s for s in receiver.spans() if f"tag={ok}" in
                        str(s.attributes.get("url.query", ""))]
    finally:
        receiver.stop()


def test_check_config_shows_the_rules_in_force(tmp_path: Path) -> None:
    import subprocess
    import sys

    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    config = tmp_path / "extproc.yaml"
    config.write_text(yaml.safe_dump({"sampling": {"rules_file": str(rules)}}))
    out = subprocess.run([sys.executable, "-m", "ext_proc", "check-config", "--config",
                          str(config)], capture_output=True, text=True, timeout=60, check=True)
    active = json.loads(out.stdout)["sampling_active"]
    assert [r["name"] for r in active["rules"]] == ["health", "checkout"]
    rules.write_text("rules: nope\n")
    bad = subprocess.run([sys.executable, "-m", "ext_proc", "check-config", "--config",
                          str(config)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "sampling.rules_file" in bad.stderr
