"""envoy/k8s, envoy/istio, envoy/envoy-gateway: valid Kubernetes objects, wired correctly.

Core kinds are validated offline with ``kubernetes-validate`` (strict: unknown
fields fail); the Istio and Envoy Gateway custom resources against their vendored
upstream CRD schemas, as strictly, by tests/unit/deploy/test_deploy_mesh_schemas.py. The
Envoy parts inside are validated by tests/e2e/test_envoy_configs.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

import kubernetes_validate
import pytest
import yaml

from ext_proc.config import load_settings
from ext_proc.config.core import split_host_port
from ext_proc.dev.devstack import ROOT
from ext_proc.envoy_config import EG_ATTRIBUTE, EXT_PROC_FILTER, unwrap
from ext_proc.telemetry.semconv import EnvoyAttr

K8S: Final = ROOT / "envoy" / "k8s"
MANIFEST_DIRS: Final = (K8S, ROOT / "envoy" / "istio", ROOT / "envoy" / "envoy-gateway")
# Custom resources: no schema in kubernetes-validate; validated against their CRDs by
# tests/unit/deploy/test_deploy_mesh_schemas.py (which fails on a kind with no vendored CRD).
MESH_KINDS: Final = frozenset({"EnvoyFilter", "ServiceEntry", "Telemetry", "EnvoyProxy",
                               "EnvoyExtensionPolicy"})
# kustomize's build file and istioctl's install overlay, never sent to the API server.
BUILD_KINDS: Final = frozenset({"Kustomization", "IstioOperator"})
_VAR_REF: Final = re.compile(r"\$\((\w+)\)")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[Any]:
    return [pytest.param(doc, id=f"{path.relative_to(ROOT)}:{doc['kind']}")
            for directory in MANIFEST_DIRS for path in sorted(directory.glob("*.yaml"))
            for doc in _docs(path) if doc["kind"] not in MESH_KINDS | BUILD_KINDS]


def _by_kind(kind: str, directory: Path = K8S) -> list[dict[str, Any]]:
    return [d for p in sorted(directory.glob("*.yaml")) for d in _docs(p) if d["kind"] == kind]


@pytest.mark.parametrize("doc", _all_docs())
def test_manifest_is_valid(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_validation_rejects_an_unknown_field() -> None:
    (deployment,) = _by_kind("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _by_kind("Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def _pod() -> dict[str, Any]:
    (deployment,) = _by_kind("Deployment")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _containers() -> dict[str, dict[str, Any]]:
    pod = _pod()
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def _configmap_file(name: str, key: str) -> str:
    (cm,) = [c for c in _by_kind("ConfigMap") if c["metadata"]["name"] == name]
    text: str = cm["data"][key]
    return text


def test_envoy_and_sidecar_share_the_pod_over_loopback(tmp_path: Path) -> None:
    containers = _containers()
    sidecar, envoy = containers["extproc-otel"], containers["envoy"]
    assert sidecar.get("restartPolicy") == "Always"  # native sidecar: starts first, stops last
    config_path = sidecar["args"][sidecar["args"].index("--config") + 1]
    (mount,) = [m for m in sidecar["volumeMounts"] if config_path.startswith(m["mountPath"])]
    (volume,) = [v for v in _pod()["volumes"] if v["name"] == mount["name"]]
    text = _configmap_file(volume["configMap"]["name"], Path(config_path).name)
    settings_file = tmp_path / "config.yaml"
    settings_file.write_text(text)
    settings = load_settings(settings_file)  # the real settings model accepts it
    port = split_host_port(settings.server.listen)[1]
    assert port in [p["containerPort"] for p in sidecar["ports"]]
    bootstrap = yaml.safe_load(_configmap_file("extproc-otel-envoy", "envoy.yaml"))
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"]
                  if c["name"] == "extproc_otel"]
    sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]
    assert (sock["address"], sock["port_value"]) == ("127.0.0.1", port)
    envoy_config = envoy["args"][envoy["args"].index("-c") + 1]
    assert any(envoy_config.startswith(m["mountPath"]) for m in envoy["volumeMounts"])


def test_probes_resources_and_security() -> None:
    pod = _pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    for name, container in _containers().items():
        sec = container["securityContext"]
        assert sec["runAsNonRoot"] and sec["runAsUser"] != 0, name
        assert sec["readOnlyRootFilesystem"] is True, name
        assert sec["allowPrivilegeEscalation"] is False, name
        assert sec["capabilities"]["drop"] == ["ALL"], name
        assert container["resources"]["requests"] and container["resources"]["limits"], name
        assert container.get("readinessProbe") and container.get("livenessProbe"), name
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), name
    sidecar = _containers()["extproc-otel"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert sidecar[probe]["grpc"]["port"] == sidecar["ports"][0]["containerPort"]


# docs/reliability.md, section 6: the sidecar's steady RSS (the largest measured, 1 %
# sampled with the prefilter, Envoy --concurrency 2), and what a collector outage (a
# full span queue) and an overload's kept arenas add on top of it.
STEADY_RSS_MIB: Final = 84
WORST_CASE_EXTRA_MIB: Final = 70 + 45


def _sidecar_in(path: Path) -> dict[str, Any]:
    """The extproc-otel container of the Deployment in `path`."""
    (deployment,) = [d for d in _docs(path) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = [c for c in [*pod.get("initContainers", []), *pod["containers"]]
                  if c["name"] == "extproc-otel"]
    return dict(sidecar)


def _mebibytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match is not None, quantity
    return int(match.group(1)) * (1024 if match.group(2) == "Gi" else 1)


@pytest.mark.parametrize("path", [K8S / "deployment.yaml",
                                  ROOT / "envoy" / "envoy-gateway" / "sidecar.yaml"],
                         ids=lambda p: p.parent.name)
def test_sidecar_memory_is_sized_from_the_measured_rss(path: Path) -> None:
    sidecar = _sidecar_in(path)
    requested = _mebibytes(sidecar["resources"]["requests"]["memory"])
    limit = _mebibytes(sidecar["resources"]["limits"]["memory"])
    assert requested >= STEADY_RSS_MIB
    assert limit >= STEADY_RSS_MIB + WORST_CASE_EXTRA_MIB


@pytest.mark.parametrize("path", [K8S / "deployment.yaml",
                                  ROOT / "envoy" / "envoy-gateway" / "sidecar.yaml"],
                         ids=lambda p: p.parent.name)
def test_downward_api_feeds_k8s_resource_attributes(path: Path) -> None:
    sidecar = _sidecar_in(path)
    env = sidecar["env"]
    names = [e["name"] for e in env]
    attrs_at = names.index("OTEL_RESOURCE_ATTRIBUTES")
    pairs = dict(kv.split("=", 1) for kv in env[attrs_at]["value"].split(","))
    assert {"k8s.pod.name", "k8s.namespace.name", "k8s.node.name", "k8s.pod.uid"} <= set(pairs)
    assert all(key.startswith("k8s.") for key in pairs)
    for value in pairs.values():
        for ref in _VAR_REF.findall(value):
            # Kubernetes only expands variables defined earlier in the list.
            assert ref in names[:attrs_at], ref
            assert "fieldRef" in env[names.index(ref)]["valueFrom"]


def test_service_selects_the_pod_and_exposes_only_envoy() -> None:
    (service,) = _by_kind("Service")
    (deployment,) = _by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    envoy_ports = {p["name"] for p in _containers()["envoy"]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= envoy_ports
    (policy,) = _by_kind("NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    sidecar_ports = {p["containerPort"] for p in _containers()["extproc-otel"]["ports"]}
    assert not allowed & sidecar_ports


def _istio_filters() -> list[dict[str, Any]]:
    return _by_kind("EnvoyFilter", ROOT / "envoy" / "istio")


def test_istio_has_gateway_and_sidecar_variants() -> None:
    contexts = {p["match"]["context"] for f in _istio_filters() for p in f["spec"]["configPatches"]
                if p["applyTo"] == "HTTP_FILTER"}
    assert contexts == {"GATEWAY", "SIDECAR_INBOUND"}
    for envoy_filter in _istio_filters():
        (flt,) = [p["patch"]["value"] for p in envoy_filter["spec"]["configPatches"]
                  if p["applyTo"] == "HTTP_FILTER"]
        assert flt["name"] == EXT_PROC_FILTER
        assert unwrap(flt)["request_attributes"] == list(EnvoyAttr.REQUEST)  # through the prefilter
        assert unwrap(flt)["response_attributes"] == list(EnvoyAttr.RESPONSE)


def test_envoy_gateway_policy_points_at_the_sidecar_service() -> None:
    eg = ROOT / "envoy" / "envoy-gateway"
    (policy,) = _by_kind("EnvoyExtensionPolicy", eg)
    (service,) = _by_kind("Service", eg)
    (ext,) = policy["spec"]["extProc"]
    (ref,) = ext["backendRefs"]
    assert ref["name"] == service["metadata"]["name"]
    assert policy["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert ref["port"] in [p["port"] for p in service["spec"]["ports"]]
    attrs = ext["processingMode"]["request"]["attributes"]
    assert all(EG_ATTRIBUTE.match(a) for a in attrs)
    assert set(attrs) == {a for a in EnvoyAttr.REQUEST if EG_ATTRIBUTE.match(a)}
    (proxy,) = _by_kind("EnvoyProxy", eg)
    # the access log goes to the same Service (a backendRef without a namespace would be
    # looked up in the EnvoyProxy's own namespace)
    (als,) = [s["als"] for setting in proxy["spec"]["telemetry"]["accessLog"]["settings"]
              for s in setting["sinks"] if s["type"] == "ALS"]
    (log_ref,) = als["backendRefs"]
    assert (log_ref["name"], log_ref["namespace"], log_ref["port"]) == (
        ref["name"], service["metadata"]["namespace"], ref["port"])


def test_istio_access_log_reaches_the_sidecar_container_beside_envoy() -> None:
    """The ServiceEntry the extension provider names points at the sidecar's address in
    the pod (the EnvoyFilter's cluster), in the namespace of the workloads it serves."""
    istio = ROOT / "envoy" / "istio"
    (operator,) = _by_kind("IstioOperator", istio)
    (provider,) = operator["spec"]["meshConfig"]["extensionProviders"]
    for path in sorted(istio.glob("envoyfilter-*.yaml")):
        docs = {d["kind"]: d for d in _docs(path)}
        entry, telemetry = docs["ServiceEntry"], docs["Telemetry"]
        assert provider["envoyHttpAls"]["service"] in entry["spec"]["hosts"], path.name
        assert [p["number"] for p in entry["spec"]["ports"]] == [provider["envoyHttpAls"]["port"]]
        (cluster,) = [p["patch"]["value"] for p in docs["EnvoyFilter"]["spec"]["configPatches"]
                      if p["applyTo"] == "CLUSTER"]
        sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
            "address"]["socket_address"]
        assert entry["spec"]["endpoints"] == [{"address": sock["address"]}]
        assert sock["port_value"] == provider["envoyHttpAls"]["port"]
        assert {entry["metadata"]["namespace"], telemetry["metadata"]["namespace"]} == {
            docs["EnvoyFilter"]["metadata"]["namespace"]}
        assert telemetry["spec"]["accessLogging"][0]["providers"] == [{"name": provider["name"]}]
