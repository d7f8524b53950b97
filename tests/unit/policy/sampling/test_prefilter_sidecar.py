"""The sidecar's side of the prefilter: asked roots are sampled by their x-request-id
(as Envoy decided whether to ask), and the digest Envoy sends is checked against the
live plan (stale rules say so once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from ext_proc.cli import main
from ext_proc.config import PropagationSettings, RedactionSettings
from ext_proc.config.sampling import SamplingSettings
from ext_proc.policy.redaction import Redactor
from ext_proc.policy.request_policy import RequestPolicy
from ext_proc.policy.sampling import build_sampling
from ext_proc.policy.sampling.prefilter import threshold
from ext_proc.request.route_options import DEFAULT, route_options

EXTRACT = ("tracecontext", "b3")


def _policy(**sampling: object) -> tuple[RequestPolicy, TracerProvider]:
    policy = build_sampling(SamplingSettings.model_validate(sampling), environ={},
                            extract=EXTRACT)
    return RequestPolicy(Redactor(RedactionSettings()), policy), TracerProvider(
        sampler=policy.sampler)


def _sampled(policy: RequestPolicy, provider: TracerProvider, request_id: str,
             parent: Context | None = None) -> bool:
    ctx = policy.sampling_context(parent or Context(), {"x-request-id": [request_id]},
                                  path="/x", method="GET", route_name=None, tenant=None,
                                  options=DEFAULT)
    span = provider.get_tracer("t").start_span("s", context=ctx)
    return span.get_span_context().trace_flags.sampled


def _id(bucket: int) -> str:
    return f"{bucket:03x}00000-0000-4000-8000-000000000000"


def test_an_asked_root_is_sampled_exactly_below_the_threshold() -> None:
    policy, provider = _policy(ratio=0.01)
    edge = threshold(0.01)
    assert all(_sampled(policy, provider, _id(b)) for b in (0, edge - 1))
    assert not any(_sampled(policy, provider, _id(b)) for b in (edge, 4095))


def test_a_parent_still_decides_for_its_child() -> None:
    policy, provider = _policy(ratio=0.0)
    parent = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))
    ctx = set_span_in_context(NonRecordingSpan(parent))
    assert _sampled(policy, provider, _id(4095), ctx)


def test_without_the_prefilter_the_trace_id_decides() -> None:
    policy, provider = _policy(ratio=0.5, prefilter=False)
    decisions = {_sampled(policy, provider, _id(0)) for _ in range(200)}
    assert decisions == {True, False}  # the same request id, both outcomes: trace ids decide


def test_an_id_without_a_bucket_falls_back_to_the_trace_id() -> None:
    policy, provider = _policy(ratio=0.5)
    assert {_sampled(policy, provider, "not-hex") for _ in range(200)} == {True, False}


def test_envoys_digest_is_compared_with_the_live_plan(caplog: pytest.LogCaptureFixture) -> None:
    sampling = build_sampling(SamplingSettings(ratio=0.01), environ={}, extract=EXTRACT)
    watch = sampling.prefilter_watch
    live = sampling.prefilter.digest()
    watch.observe(None)  # a bare filter: nothing to compare
    assert watch.describe()["envoy_digest"] is None and not watch.stale
    watch.observe(live)
    assert not watch.stale and "stale" not in caplog.text
    sampling.reload(SamplingSettings(ratio=0.5))  # the rules file raised the ratio
    assert watch.stale and watch.describe()["digest"] != live
    for _ in range(3):
        watch.observe(live)
    assert caplog.text.count("prefilter is stale") == 1
    assert sampling.describe()["prefilter"]["stale"] is True


def test_the_digest_arrives_as_ext_proc_metadata() -> None:
    options = route_options([("x-extproc-otel-prefilter", "0123abcd"),
                             ("x-extproc-otel-http-route", "/x")])
    assert options.prefilter_digest == "0123abcd" and options.http_route == "/x"


def _check(tmp_path: Path, envoy_yaml: str, **sampling: object) -> Result:
    (tmp_path / "envoy.yaml").write_text(envoy_yaml)
    (tmp_path / "extproc.yaml").write_text(yaml.safe_dump({"sampling": sampling}))
    return CliRunner().invoke(main, ["check-config", "--config", str(tmp_path / "extproc.yaml"),
                                     "--envoy-config", str(tmp_path / "envoy.yaml")])


def test_check_config_compares_an_envoy_config(tmp_path: Path) -> None:
    live = build_sampling(SamplingSettings(ratio=0.01), environ={},
                          extract=PropagationSettings().extract).prefilter.digest()
    carried = yaml.safe_dump({"grpc_service": {"initial_metadata": [
        {"key": "x-extproc-otel-prefilter", "value": live}]}})
    fresh = _check(tmp_path, carried, ratio=0.01)
    assert fresh.exit_code == 0 and "warning" not in fresh.stderr
    shown = json.loads(fresh.stdout)["sampling_active"]["prefilter"]
    assert shown["digest"] == live and shown["envoy_digest"] == live
    assert not shown["stale"]
    stale = _check(tmp_path, carried, ratio=0.2)
    assert stale.exit_code == 0 and "is not the one these settings compile to" in stale.stderr
    assert json.loads(stale.stdout)["sampling_active"]["prefilter"]["stale"] is True
    bare = _check(tmp_path, "static_resources: {}\n", ratio=0.2, prefilter=False)
    assert "warning" not in bare.stderr


@pytest.mark.parametrize("method", ["PURGE", "get"])
def test_a_rule_on_a_method_matches_the_method_as_sent(method: str) -> None:
    """Envoy's matcher compares :method as sent (case-insensitively); the session must
    hand the sampling rules the same, not http.request.method's _OTHER."""
    from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from ext_proc.exchange.session import StreamDeps, StreamSession
    from ext_proc.policy.propagation import PropagatorCache, Rejections

    sampling = build_sampling(SamplingSettings.model_validate(
        {"ratio": 1.0, "rules": [{"method": method, "ratio": 0.0}]}), environ={})
    provider = TracerProvider(sampler=sampling.sampler)
    deps = StreamDeps(tracer=provider.get_tracer("t"),
                      propagator=PropagatorCache(Rejections()).get(PropagationSettings()),
                      attributes_namespace="envoy.filters.http.ext_proc",
                      metadata_namespace="extproc_otel",
                      policy=RequestPolicy(Redactor(RedactionSettings()), sampling))
    session = StreamSession(deps)
    request = pb.ProcessingRequest()
    for key, value in ((":method", method), (":path", "/x"), ("x-request-id", _id(0))):
        request.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    session.handle(request)
    assert session.span is not None and not session.span.get_span_context().trace_flags.sampled
