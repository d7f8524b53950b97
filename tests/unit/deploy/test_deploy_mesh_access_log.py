"""The meshes get Envoy's access log to the sidecar, as the bootstrap has it (#19, item 4).

* Istio: the ``envoyHttpAls`` extension provider (mesh config) and the ``ServiceEntry`` +
  ``Telemetry`` that `envoy-config --format istio` prints. The mesh config is no custom
  resource: it is checked against Istio's own ``MeshConfig`` message, parsed from
  ``mesh/v1alpha1/config.proto`` of istio/api v1.30.3 (vendored, gzipped, provenance in
  tests/data/README.md), as strictly as istiod reads it (proto JSON: an unknown field
  fails, either name form of a field, one member of a ``oneof``).
* Envoy Gateway: the ``EnvoyProxy`` access-log sink of type ALS.

The CRD schemas of ServiceEntry, Telemetry and EnvoyProxy are checked by
tests/unit/deploy/test_deploy_mesh_schemas.py; here, what they say: the same sidecar,
port, log name and logged fields as the bootstrap's ``access_log_join``.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Final

import pytest
import yaml
from click.testing import CliRunner

from ext_proc.cli import main
from ext_proc.config import Settings, load_settings
from ext_proc.dev.devstack import ROOT, free_port
from ext_proc.envoy_config import istio_mesh_config, options_for, render, unwrap

Doc = dict[str, Any]

PROTO: Final = ROOT / "tests" / "data" / "istio-mesh-config.proto.gz"
MESH_FILE: Final = ROOT / "envoy" / "istio" / "meshconfig.yaml"
EG_FILE: Final = ROOT / "envoy" / "envoy-gateway" / "extproc-otel.yaml"
ALS: Final = "envoy.access_loggers.http_grpc"
_SCALARS: Final[dict[str, type | tuple[type, ...]]] = {
    "string": str, "bytes": str, "bool": bool, "double": (int, float), "float": (int, float),
    **{t: int for t in ("int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
                        "fixed64", "sfixed32", "sfixed64")}}


@dataclass
class Field:
    name: str  # the proto name, snake_case
    type: str
    repeated: bool = False
    map_value: str | None = None
    oneof: str | None = None


@dataclass
class Message:
    full_name: str
    fields: dict[str, Field] = field(default_factory=dict)  # by JSON name and proto name


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@functools.cache
def mesh_proto() -> tuple[dict[str, Message], frozenset[str]]:
    """The messages (by full name) and enums of the vendored config.proto."""
    text = gzip.decompress(PROTO.read_bytes()).decode()
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.DOTALL)
    package = re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.MULTILINE)
    assert package
    messages: dict[str, Message] = {}
    enums: set[str] = set()
    scope: list[tuple[str, str]] = []  # (kind, name) of the open blocks
    pending = ""
    for token in re.findall(r'"(?:[^"\\]|\\.)*"|[{};]|[^{};"]+', text):
        if token not in "{};":
            pending += token
            continue
        words = pending.split()
        pending = ""
        names = [n for k, n in scope if k == "message"]
        if token == "{":
            kind = words[0] if words else "option"
            if kind == "message":
                full = ".".join([package.group(1), *names, words[1]])
                messages[full] = Message(full)
                scope.append(("message", words[1]))
            elif kind == "enum":
                enums.add(".".join([package.group(1), *names, words[1]]))
                scope.append(("enum", words[1]))
            elif kind == "oneof":
                scope.append(("oneof", words[1]))
            else:  # an aggregate option value, or a service: nothing we read
                scope.append(("other", ""))
        elif token == "}":
            scope.pop()
        elif scope and scope[-1][0] in ("message", "oneof") and words \
                and words[0] not in ("option", "reserved", "extensions"):
            statement = " ".join(words)
            found = re.match(r"(?:(repeated|optional)\s+)?(map\s*<\s*(\w+)\s*,\s*([\w.]+)\s*>|"
                             r"[\w.]+)\s+(\w+)\s*=", statement)
            assert found, statement
            label, type_, _, map_value, name = found.groups()
            message = messages[".".join([package.group(1), *names])]
            oneof = scope[-1][1] if scope[-1][0] == "oneof" else None
            entry = Field(name, type_, label == "repeated", map_value, oneof)
            message.fields[name] = message.fields[_json_name(name)] = entry
    return messages, frozenset(enums)


def _resolve(type_: str, scope: str) -> str | None:
    """The full name of a message or enum of this file as seen from `scope`; None for a
    scalar or a type of another file (ProxyConfig, google.protobuf.*: not checked)."""
    messages, enums = mesh_proto()
    parts = scope.split(".")
    for end in range(len(parts), 1, -1):
        candidate = ".".join([*parts[:end], type_])
        if candidate in messages or candidate in enums:
            return candidate
    return None


def mesh_config_errors(value: Any, message: str = "istio.mesh.v1alpha1.MeshConfig",
                       path: str = "meshConfig") -> list[str]:
    """What istiod would refuse in a ``meshConfig`` (proto JSON into `message`)."""
    messages, enums = mesh_proto()
    if not isinstance(value, dict):
        return [f"{path}: {value!r} is not an object"]
    errors: list[str] = []
    oneofs: dict[str, str] = {}
    for key, item in value.items():
        spec = messages[message].fields.get(key)
        if spec is None:
            errors.append(f"{path}.{key}: unknown field of {message.rpartition('.')[2]}")
            continue
        if spec.oneof is not None:
            if spec.oneof in oneofs:
                errors.append(f"{path}.{key}: oneof {spec.oneof} already set by "
                              f"{oneofs[spec.oneof]}")
            oneofs[spec.oneof] = key
        if spec.map_value is not None:
            if not isinstance(item, dict):
                errors.append(f"{path}.{key}: {item!r} is not a map")
                continue
            errors += [e for k, v in item.items() for e in _value_errors(
                v, spec.map_value, message, f"{path}.{key}.{k}", messages, enums)]
        elif spec.repeated:
            if not isinstance(item, list):
                errors.append(f"{path}.{key}: {item!r} is not a list")
                continue
            errors += [e for i, v in enumerate(item) for e in _value_errors(
                v, spec.type, message, f"{path}.{key}[{i}]", messages, enums)]
        else:
            errors += _value_errors(item, spec.type, message, f"{path}.{key}", messages, enums)
    return errors


def _value_errors(value: Any, type_: str, scope: str, path: str,
                  messages: dict[str, Message], enums: frozenset[str]) -> list[str]:
    if type_ in _SCALARS:
        wanted = _SCALARS[type_]
        ok = isinstance(value, wanted) and not (wanted is not bool and isinstance(value, bool))
        if ok and type_.startswith(("uint", "fixed")) and value < 0:
            ok = False
        return [] if ok else [f"{path}: {value!r} is not a {type_}"]
    full = _resolve(type_, scope)
    if full is None:
        return []  # defined in another file: not checked here
    if full in enums:
        return [] if isinstance(value, str | int) and not isinstance(value, bool) else [
            f"{path}: {value!r} is not an enum value"]
    return mesh_config_errors(value, full, path)


# --- the mesh config is checked against Istio's proto ----------------------------------


def test_vendored_proto_is_the_upstream_file() -> None:
    data = gzip.decompress(PROTO.read_bytes())
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    (row,) = [r for r in (ROOT / "tests" / "data" / "README.md").read_text().splitlines()
              if f"`{PROTO.name}`" in r]
    assert f"`{blob}`" in row


def test_the_parser_reads_the_provider_messages() -> None:
    messages, _ = mesh_proto()
    als = messages["istio.mesh.v1alpha1.MeshConfig.ExtensionProvider.EnvoyHttpGrpcV3LogProvider"]
    assert {f.name for f in als.fields.values()} == {
        "service", "port", "log_name", "filter_state_objects_to_log",
        "additional_request_headers_to_log", "additional_response_headers_to_log",
        "additional_response_trailers_to_log"}
    provider = messages["istio.mesh.v1alpha1.MeshConfig.ExtensionProvider"]
    assert provider.fields["envoyHttpAls"].oneof == "provider"
    assert provider.fields["envoy_http_als"] is provider.fields["envoyHttpAls"]
    mesh = messages["istio.mesh.v1alpha1.MeshConfig"]
    assert mesh.fields["extensionProviders"].repeated


def _shipped_mesh_config() -> Doc:
    (doc,) = [d for d in yaml.safe_load_all(MESH_FILE.read_text()) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("install.istio.io/v1alpha1", "IstioOperator")
    assert set(doc["spec"]) == {"meshConfig"}  # an overlay of the mesh config only
    mesh: Doc = doc["spec"]["meshConfig"]
    return mesh


def _printed_mesh_config(*args: str) -> Doc:
    """The ``meshConfig`` block in the leading comment of ``--format istio``."""
    result = CliRunner().invoke(main, ["envoy-config", "--format", "istio", *args])
    assert result.exit_code == 0, result.output
    block = "\n".join(line[4:] for line in result.output.splitlines()
                      if line.startswith("#   "))
    mesh: Doc = yaml.safe_load(block)["meshConfig"]
    return mesh


def test_shipped_mesh_config_is_valid_and_what_envoy_config_prints() -> None:
    shipped = _shipped_mesh_config()
    assert mesh_config_errors(shipped) == []
    assert shipped == _printed_mesh_config() == istio_mesh_config(options_for(Settings()))


def test_printed_mesh_config_follows_the_sidecar_address() -> None:
    port = free_port()
    mesh = _printed_mesh_config("--sidecar-address", f"127.0.0.1:{port}")
    assert mesh_config_errors(mesh) == []
    assert mesh["extensionProviders"][0]["envoyHttpAls"]["port"] == port


def _provider(mesh: Doc) -> Doc:
    entry: Doc = mesh["extensionProviders"][0]
    return entry


# name: (how the mesh config is broken, what the error names)
_MESH_MISTAKES: Final = {
    "extensionProvider": (lambda m: m.update(extensionProvider=m.pop("extensionProviders")),
                          "meshConfig.extensionProvider: unknown field of MeshConfig"),
    "envoyHttpALS": (lambda m: _provider(m).update(envoyHttpALS=_provider(m).pop("envoyHttpAls")),
                     "envoyHttpALS: unknown field of ExtensionProvider"),
    "logname": (lambda m: _provider(m)["envoyHttpAls"].update(logname="x"),
                "logname: unknown field of EnvoyHttpGrpcV3LogProvider"),
    "additionalResponseHeaderToLog": (
        lambda m: _provider(m)["envoyHttpAls"].update(additionalResponseHeaderToLog=["a"]),
        "additionalResponseHeaderToLog: unknown field"),
    "buffer settings": (  # Envoy has them, Istio's provider does not
        lambda m: _provider(m)["envoyHttpAls"].update(bufferFlushInterval="0.05s"),
        "bufferFlushInterval: unknown field"),
    "two providers in one entry": (
        lambda m: _provider(m).update(envoyTcpAls={"service": "x", "port": 1}),
        "oneof provider already set"),
    "port type": (lambda m: _provider(m)["envoyHttpAls"].update(port=-1), "is not a uint32"),
    "headers type": (lambda m: _provider(m)["envoyHttpAls"].update(
        additionalResponseHeadersToLog="grpc-status"), "is not a list"),
}


@pytest.mark.parametrize("case", list(_MESH_MISTAKES))
def test_a_misspelt_or_mistyped_mesh_config_fails(case: str) -> None:
    breaks, named = _MESH_MISTAKES[case]
    mesh = copy.deepcopy(_shipped_mesh_config())
    breaks(mesh)
    errors = mesh_config_errors(mesh)
    assert len(errors) == 1 and named in errors[0], errors


def test_either_name_form_of_a_field_is_accepted() -> None:
    mesh = copy.deepcopy(_shipped_mesh_config())
    als = _provider(mesh)["envoyHttpAls"]
    als["log_name"] = als.pop("logName")  # protojson reads both
    assert mesh_config_errors({"extension_providers": mesh["extensionProviders"]}) == []


# --- what the meshes log, and where to: the bootstrap's access_log_join -----------------


def _docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


def _one(docs: list[Doc], kind: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _bootstrap_join(settings: Settings, **opts: Any) -> tuple[Doc, dict[str, Any]]:
    """The bootstrap's access log to the sidecar, and the socket address of its cluster."""
    (boot,) = _docs(render("bootstrap", settings, options_for(settings, **opts)))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    (log,) = [a for a in hcm["access_log"] if a["name"] == ALS]
    cluster_name = log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"][
        "cluster_name"]
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == cluster_name]
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    typed: Doc = log["typed_config"]
    return typed, endpoint["endpoint"]["address"]["socket_address"]


_LOGGED: Final = (("additional_request_headers_to_log", "additionalRequestHeadersToLog",
                   "requestHeaders"),
                  ("additional_response_headers_to_log", "additionalResponseHeadersToLog",
                   "responseHeaders"),
                  ("additional_response_trailers_to_log", "additionalResponseTrailersToLog",
                   "responseTrailers"))


@pytest.mark.parametrize("context", ["gateway", "sidecar"])
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_istio_access_log_goes_where_the_bootstrap_sends_it(context: str, host: str) -> None:
    settings = load_settings(server={"listen": f"{host}:{free_port()}"})
    join, sidecar = _bootstrap_join(settings)
    opts = options_for(settings, istio_context=context)
    docs = _docs(render("istio", settings, opts))
    entry, telemetry = _one(docs, "ServiceEntry"), _one(docs, "Telemetry")
    envoy_filter = _one(docs, "EnvoyFilter")
    (provider,) = istio_mesh_config(opts)["extensionProviders"]
    als = provider["envoyHttpAls"]
    # the provider names the ServiceEntry, which is the sidecar the ext_proc cluster reaches
    assert als["service"] in entry["spec"]["hosts"]
    (port,) = entry["spec"]["ports"]
    assert als["port"] == port["number"] == sidecar["port_value"]
    assert port["protocol"] == "GRPC"  # HTTP/2 to the sidecar
    assert entry["spec"]["endpoints"] == [{"address": sidecar["address"]}]
    (cluster,) = [p["patch"]["value"] for p in envoy_filter["spec"]["configPatches"]
                  if p["applyTo"] == "CLUSTER"]
    assert cluster["name"] == join["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    # it logs what the bootstrap logs
    assert als["logName"] == join["common_config"]["log_name"]
    for envoy_field, istio_field, _ in _LOGGED:
        assert als.get(istio_field, []) == join.get(envoy_field, []), istio_field
    assert join["additional_response_trailers_to_log"] == ["grpc-status"]  # not vacuous
    # the Telemetry enables it for the workloads the EnvoyFilter patches, and only
    # their traffic the filter sees
    (logging,) = telemetry["spec"]["accessLogging"]
    assert logging["providers"] == [{"name": provider["name"]}]
    assert telemetry["spec"]["selector"]["matchLabels"] == envoy_filter["spec"][
        "workloadSelector"]["labels"]
    assert logging["match"]["mode"] == {"gateway": "CLIENT", "sidecar": "SERVER"}[context]


def test_envoy_gateway_access_log_goes_where_the_bootstrap_sends_it() -> None:
    settings = load_settings(server={"listen": f"0.0.0.0:{free_port()}"})
    join, sidecar = _bootstrap_join(settings)
    docs = _docs(render("envoy-gateway", settings, options_for(settings)))
    proxy, policy = _one(docs, "EnvoyProxy"), _one(docs, "EnvoyExtensionPolicy")
    (setting,) = proxy["spec"]["telemetry"]["accessLog"]["settings"]
    (sink,) = [s for s in setting["sinks"] if s["type"] == "ALS"]
    als = sink["als"]
    (ext_proc,) = policy["spec"]["extProc"]
    assert als["backendRefs"] == ext_proc["backendRefs"]  # the sidecar Service
    assert [ref["port"] for ref in als["backendRefs"]] == [sidecar["port_value"]]
    assert als["type"] == "HTTP"
    assert als["logName"] == join["common_config"]["log_name"]
    for envoy_field, _, eg_field in _LOGGED:
        assert als.get("http", {}).get(eg_field, []) == join.get(envoy_field, []), eg_field
    # the stdout log Envoy Gateway writes unless told otherwise stays
    assert {"type": "File", "file": {"path": "/dev/stdout"}} in setting["sinks"]


# --- lean mode: Istio (sidecar in the pod) yes, Envoy Gateway (a Service) no -----------


def _filter_config(settings: Settings) -> Doc:
    docs = _docs(render("istio", settings, options_for(settings)))
    (value,) = [p["patch"]["value"] for p in _one(docs, "EnvoyFilter")["spec"]["configPatches"]
                if p["applyTo"] == "HTTP_FILTER"]
    return unwrap(value)


@pytest.mark.parametrize("join", [True, False])
def test_istio_filter_is_lean_exactly_when_the_sidecar_joins_the_access_log(join: bool) -> None:
    config = _filter_config(load_settings(stream={"join_access_log": join}))
    mode = config["processing_mode"]
    expected = "SKIP" if join else "SEND"
    assert (mode["response_header_mode"], mode["response_trailer_mode"]) == (expected, expected)
    assert config.get("allow_mode_override", False) is join


def test_envoy_gateway_keeps_the_response_phase() -> None:
    """No lean mode: the ALS entry of a request may reach another sidecar replica."""
    docs = _docs(render("envoy-gateway", Settings(), options_for(Settings())))
    (ext_proc,) = _one(docs, "EnvoyExtensionPolicy")["spec"]["extProc"]
    mode = ext_proc["processingMode"]
    assert "response" in mode and "allowModeOverride" not in ext_proc


def _without_namespaces(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_namespaces(v) for k, v in node.items() if k != "namespace"}
    if isinstance(node, list):
        return [_without_namespaces(v) for v in node]
    return node


def test_shipped_envoy_gateway_file_is_what_envoy_config_prints() -> None:
    """Only namespaces are added: the ALS backendRef names the sidecar Service's, since
    the EnvoyProxy lives in Envoy Gateway's own namespace."""
    shipped = _docs(EG_FILE.read_text())
    printed = _docs(render("envoy-gateway", Settings(), options_for(Settings())))
    assert _without_namespaces(shipped) == printed
    (setting,) = _one(shipped, "EnvoyProxy")["spec"]["telemetry"]["accessLog"]["settings"]
    (ref,) = next(s for s in setting["sinks"] if s["type"] == "ALS")["als"]["backendRefs"]
    assert ref["namespace"] == _one(shipped, "EnvoyExtensionPolicy")["metadata"]["namespace"]
