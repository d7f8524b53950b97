"""Istio and Envoy Gateway resources pass their upstream CRD schemas.

The CRDs are vendored in tests/data/crds/, unchanged but gzipped so that nothing
which scans the repository's YAML for Envoy config or Kubernetes objects mistakes
them for the project's own (provenance in tests/data/README.md). Every custom
resource in the repository (``envoy/``, and the YAML blocks of the Markdown docs)
and what ``extproc-otel envoy-config --format istio|envoy-gateway`` prints is
checked the way the API server checks a create under strict field validation
(``kubectl apply --validate=strict``):

* against the ``openAPIV3Schema`` of the served CRD version its ``apiVersion`` names;
* an unknown field fails anywhere, except below ``x-kubernetes-preserve-unknown-fields``
  (EnvoyFilter ``patch.value``), where the server keeps what it does not know; an
  ``additionalProperties`` schema makes a map whose values are checked;
  ``x-kubernetes-embedded-resource`` admits apiVersion, kind and metadata;
* ``x-kubernetes-int-or-string``, ``nullable``, and unique entries in
  ``x-kubernetes-list-type: set`` / ``map`` lists;
* ``metadata`` against the real ObjectMeta schema (kubernetes-validate), with a
  name that is a DNS-1123 subdomain.

Not evaluated: the CEL rules (``x-kubernetes-validations``) and string formats. A
null where the schema is not ``nullable`` fails here, while the server drops it.
The Envoy config inside (patch values, the policy's filter) is run through
``envoy --mode validate`` by tests/unit/envoy_config/test_envoy_config_gen.py (generated) and
tests/e2e/test_envoy_configs.py (shipped files).
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from jsonschema.exceptions import ValidationError

from ext_proc.cli import main
from ext_proc.dev.devstack import ROOT
from ext_proc.envoy_config.embed import markdown_yaml_blocks

Doc = dict[str, Any]

CRDS: Final = ROOT / "tests" / "data" / "crds"
_SKIP_DIRS: Final = {".venv", ".git", "_gen", "node_modules", "build", "dist", "data"}
# kustomize's own build file: read by kustomize, never sent to the API server; istioctl's
# install overlay (IstioOperator: envoy/istio/meshconfig.yaml), read by istioctl since Istio
# removed the in-cluster operator (its meshConfig is checked against Istio's proto by
# tests/unit/deploy/test_deploy_mesh_access_log.py).
NOT_API_GROUPS: Final = frozenset({"kustomize.config.k8s.io", "install.istio.io"})
SHIPPED_KINDS: Final = frozenset({"EnvoyFilter", "ServiceEntry", "Telemetry", "EnvoyProxy",
                                  "EnvoyExtensionPolicy"})
_LABEL: Final = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN: Final = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_DNS_LABEL: Final = re.compile(rf"^{_LABEL}$")
# The server handles these itself at the root (and in embedded resources).
_OBJECT_FIELDS: Final = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                         "metadata": {"type": "object"}}
_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 2.4 MB

_draft4_type = jsonschema.Draft4Validator.VALIDATORS["type"]


def _type(validator: Any, types: Any, instance: Any, schema: Doc) -> Iterator[ValidationError]:
    if instance is None and schema.get("nullable") is True:
        return
    yield from _draft4_type(validator, types, instance, schema)


def _int_or_string(validator: Any, on: Any, instance: Any, _: Doc) -> Iterator[ValidationError]:
    if on and not (validator.is_type(instance, "integer") or validator.is_type(instance, "string")):
        yield ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator: Any, kind: Any, instance: Any, schema: Doc) -> Iterator[ValidationError]:
    if kind not in ("set", "map") or not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: set[str] = set()
    for item in instance:
        key = json.dumps([item.get(k) for k in keys] if kind == "map" and isinstance(item, dict)
                         else item, sort_keys=True)
        if key in seen:
            yield ValidationError(f"duplicate entry {key} in a list of type {kind}")
        seen.add(key)


# OpenAPI v3.0 schemas are draft 4 (boolean exclusiveMinimum) plus Kubernetes' keywords.
K8sValidator: Final = jsonschema.validators.extend(jsonschema.Draft4Validator, {
    "type": _type,
    "x-kubernetes-int-or-string": _int_or_string,
    "x-kubernetes-list-type": _list_type,
})


def strict(node: Doc) -> Doc:
    """A copy of a structural schema in which every field the server would prune fails.

    Only the structural part is closed (properties, items, additionalProperties):
    the allOf/anyOf/oneOf/not branches of a structural schema may not declare fields.
    """
    out = dict(node)
    props = {name: strict(sub) for name, sub in node.get("properties", {}).items()}
    if node.get("x-kubernetes-embedded-resource"):
        props = {**props, **_OBJECT_FIELDS}
    if props:
        out["properties"] = props
    if isinstance(node.get("items"), dict):
        out["items"] = strict(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(node["additionalProperties"])
    elif ((node.get("type") == "object" or props) and "additionalProperties" not in node
          and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _load(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]


@functools.cache
def _crds() -> dict[tuple[str, str], Doc]:
    return {(crd["spec"]["group"], crd["spec"]["names"]["kind"]): crd
            for path in sorted(CRDS.glob("*.yaml.gz"))
            for crd in _load(gzip.decompress(path.read_bytes()).decode())
            if crd.get("kind") == "CustomResourceDefinition"}


def _group_kind(doc: Doc) -> tuple[str, str]:
    return str(doc.get("apiVersion", "")).rpartition("/")[0], str(doc.get("kind"))


def _crd_schema(doc: Doc) -> Doc | str:
    """The schema of the CRD version the document names, or why there is none."""
    (group, kind), version = _group_kind(doc), str(doc.get("apiVersion")).rpartition("/")[2]
    crd = _crds().get((group, kind))
    if crd is None:
        return f"no vendored CRD for {kind}.{group} (add it to {CRDS.relative_to(ROOT)})"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if version not in served:
        return f"{kind}.{group} serves {sorted(served)}, not {version!r}"
    schema: Doc = served[version]["schema"]["openAPIV3Schema"]
    return schema


@functools.cache
def _validator(group: str, kind: str, version: str) -> Any:
    schema = _crd_schema({"apiVersion": f"{group}/{version}", "kind": kind})
    assert isinstance(schema, dict), schema
    root = strict(schema)
    root["properties"] = {**root.get("properties", {}), **_OBJECT_FIELDS}
    return K8sValidator(root)


def _metadata_errors(meta: Any) -> list[str]:
    if not isinstance(meta, dict) or not meta.get("name"):
        return ["$.metadata.name: required"]
    errors = []
    try:  # ObjectMeta's real schema, borrowed through a kind that adds nothing to it
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta},
                                     kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"$.metadata: {exc.message}")
    name, namespace = meta["name"], meta.get("namespace")
    if not (isinstance(name, str) and len(name) <= 253 and _DNS_SUBDOMAIN.match(name)):
        errors.append(f"$.metadata.name: {name!r} is not a DNS-1123 subdomain")
    if namespace is not None and not (isinstance(namespace, str) and len(namespace) <= 63
                                      and _DNS_LABEL.match(namespace)):
        errors.append(f"$.metadata.namespace: {namespace!r} is not a DNS-1123 label")
    return errors


def schema_errors(doc: Doc) -> list[str]:
    """What the API server (strict field validation, CEL aside) would reject in ``doc``."""
    schema = _crd_schema(doc)
    if isinstance(schema, str):
        return [schema]
    (group, kind), version = _group_kind(doc), str(doc["apiVersion"]).rpartition("/")[2]
    found = sorted(_validator(group, kind, version).iter_errors(doc), key=lambda e: e.json_path)
    return [f"{e.json_path}: {e.message}" for e in found] + _metadata_errors(doc.get("metadata"))


def _has_builtin_schema(doc: Doc) -> bool:
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        pass  # a built-in kind: tests/unit/deploy/test_deploy_k8s.py reports it
    return True


def _repo_files() -> Iterator[Path]:
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        yield from (Path(top) / f for f in sorted(files) if f.endswith((".yaml", ".yml", ".md")))


def _repo_docs() -> Iterator[tuple[str, Doc]]:
    """Every Kubernetes object in the repository's YAML files and Markdown YAML blocks."""
    for path in _repo_files():
        texts = markdown_yaml_blocks(path.read_text()) if path.suffix == ".md" else \
            [path.read_text()]
        for text in texts:
            try:
                docs = _load(text)
            except yaml.YAMLError:
                continue  # a Markdown fragment that is not YAML on its own
            for doc in docs:
                if isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str) \
                        and isinstance(doc.get("kind"), str):
                    yield f"{path.relative_to(ROOT)}:{doc['kind']}", doc


@functools.cache
def _custom_resources() -> tuple[tuple[str, Doc], ...]:
    return tuple((where, doc) for where, doc in _repo_docs()
                 if _group_kind(doc)[0] not in NOT_API_GROUPS and not _has_builtin_schema(doc))


def _shipped(path: str, kind: str) -> Doc:
    (doc,) = [d for d in _load((ROOT / path).read_text()) if d["kind"] == kind]
    return copy.deepcopy(doc)


def _generated(*args: str) -> list[Doc]:
    result = CliRunner().invoke(main, ["envoy-config", *args])
    assert result.exit_code == 0, result.output
    return _load(result.output)


def test_every_custom_resource_in_the_repo_has_a_vendored_schema() -> None:
    kinds = {_group_kind(doc) for _, doc in _custom_resources()}
    assert SHIPPED_KINDS <= {kind for _, kind in kinds}  # discovery finds the mesh files
    assert kinds - set(_crds()) == set(), "vendor the CRD of each kind under tests/data/crds"


@pytest.mark.parametrize("where, doc", [pytest.param(w, d, id=w) for w, d in _custom_resources()])
def test_shipped_resource_passes_its_crd(where: str, doc: Doc) -> None:
    assert schema_errors(doc) == [], where


@pytest.mark.parametrize("args", [("--format", "istio"),
                                  ("--format", "istio", "--istio-context", "sidecar"),
                                  ("--format", "envoy-gateway")], ids=" ".join)
def test_envoy_config_output_passes_its_crd(args: tuple[str, ...]) -> None:
    docs = _generated(*args)
    assert {d["kind"] for d in docs} <= SHIPPED_KINDS and docs
    for doc in docs:
        assert schema_errors(doc) == [], doc["kind"]


_INGRESS: Final = "envoy/istio/envoyfilter-ingressgateway.yaml"
_EG: Final = "envoy/envoy-gateway/extproc-otel.yaml"


def _rename(node: Doc, old: str, new: str) -> None:
    node[new] = node.pop(old)


def _filter(doc: Doc) -> Doc:
    patch: Doc = doc["spec"]["configPatches"][0]
    return patch


def _ext_proc(doc: Doc) -> Doc:
    entry: Doc = doc["spec"]["extProc"][0]
    return entry


def _logging(doc: Doc) -> Doc:
    entry: Doc = doc["spec"]["accessLogging"][0]
    return entry


def _als(doc: Doc) -> Doc:
    sink: Doc = doc["spec"]["telemetry"]["accessLog"]["settings"][0]["sinks"][0]
    assert sink["type"] == "ALS"
    return sink


# name: (file, kind, how it is broken, what the error names)
_UNKNOWN_FIELDS: Final[dict[str, tuple[str, str, Callable[[Doc], None], str]]] = {
    "configPatchs": (_INGRESS, "EnvoyFilter",
                     lambda d: _rename(d["spec"], "configPatches", "configPatchs"), "configPatchs"),
    "applyto": (_INGRESS, "EnvoyFilter", lambda d: _rename(_filter(d), "applyTo", "applyto"),
                "applyto"),
    "subfilter": (_INGRESS, "EnvoyFilter", lambda d: _rename(
        _filter(d)["match"]["listener"]["filterChain"]["filter"], "subFilter", "subfilter"),
                  "subfilter"),
    "root specs": (_INGRESS, "EnvoyFilter", lambda d: _rename(d, "spec", "specs"), "specs"),
    "metadata lables": (_INGRESS, "EnvoyFilter", lambda d: d["metadata"].update(lables={}),
                        "lables"),
    "metadata without name": (_EG, "EnvoyProxy", lambda d: d["metadata"].pop("name"),
                              "metadata.name"),
    "extProc failopen": (_EG, "EnvoyExtensionPolicy",
                         lambda d: _rename(_ext_proc(d), "failOpen", "failopen"), "failopen"),
    "extProc requestAttributes": (_EG, "EnvoyExtensionPolicy", lambda d: _ext_proc(d).update(
        requestAttributes=["request.id"]), "requestAttributes"),
    "bootstrap valu": (_EG, "EnvoyProxy", lambda d: _rename(d["spec"]["bootstrap"], "value",
                                                            "valu"), "valu"),
    "ServiceEntry endpoint adress": (_INGRESS, "ServiceEntry", lambda d: _rename(
        d["spec"]["endpoints"][0], "address", "adress"), "adress"),
    "ServiceEntry exportto": (_INGRESS, "ServiceEntry", lambda d: _rename(
        d["spec"], "exportTo", "exportto"), "exportto"),
    "Telemetry accessLoging": (_INGRESS, "Telemetry", lambda d: _rename(
        d["spec"], "accessLogging", "accessLoging"), "accessLoging"),
    "Telemetry provider": (_INGRESS, "Telemetry", lambda d: _rename(
        _logging(d), "providers", "provider"), "provider"),
    "ALS backendrefs": (_EG, "EnvoyProxy", lambda d: _rename(_als(d)["als"], "backendRefs",
                                                             "backendrefs"), "backendrefs"),
    "ALS logname": (_EG, "EnvoyProxy", lambda d: _rename(_als(d)["als"], "logName", "logname"),
                    "logname"),
    "ALS http requestTrailers": (_EG, "EnvoyProxy", lambda d: _als(d)["als"]["http"].update(
        requestTrailers=["x"]), "requestTrailers"),
    "telemetry accessLogs": (_EG, "EnvoyProxy", lambda d: _rename(
        d["spec"]["telemetry"], "accessLog", "accessLogs"), "accessLogs"),
}
_BAD_VALUES: Final[dict[str, tuple[str, str, Callable[[Doc], None], str]]] = {
    "applyTo enum": (_INGRESS, "EnvoyFilter", lambda d: _filter(d).update(applyTo="HTTP_FILTERS"),
                     "HTTP_FILTERS"),
    "operation enum": (_INGRESS, "EnvoyFilter",
                       lambda d: _filter(d)["patch"].update(operation="INSERT_BEFOR"),
                       "INSERT_BEFOR"),
    "context enum": (_INGRESS, "EnvoyFilter",
                     lambda d: _filter(d)["match"].update(context="SIDECAR"), "SIDECAR"),
    "body enum": (_EG, "EnvoyExtensionPolicy", lambda d: _ext_proc(d)["processingMode"][
        "request"].update(body="Buffer"), "Buffer"),
    "bootstrap type enum": (_EG, "EnvoyProxy",
                            lambda d: d["spec"]["bootstrap"].update(type="merge"), "merge"),
    "messageTimeout pattern": (_EG, "EnvoyExtensionPolicy",
                               lambda d: _ext_proc(d).update(messageTimeout="0.2s"), "0.2s"),
    "attribute pattern": (_EG, "EnvoyExtensionPolicy", lambda d: _ext_proc(d)["processingMode"][
        "request"]["attributes"].append("xds.cluster_name"), "xds.cluster_name"),
    "label value type": (_INGRESS, "EnvoyFilter", lambda d: d["spec"]["workloadSelector"][
        "labels"].update(version=2), "2 is not of type"),
    "served version": (_INGRESS, "EnvoyFilter",
                       lambda d: d.update(apiVersion="networking.istio.io/v1beta1"), "v1beta1"),
    "metadata name": (_EG, "EnvoyProxy", lambda d: d["metadata"].update(name="ExtProc_OTel"),
                      "DNS-1123"),
    "Telemetry mode enum": (_INGRESS, "Telemetry",
                            lambda d: _logging(d)["match"].update(mode="SERVERS"), "SERVERS"),
    "ServiceEntry resolution enum": (_INGRESS, "ServiceEntry",
                                     lambda d: d["spec"].update(resolution="static"), "static"),
    "ServiceEntry port type": (_INGRESS, "ServiceEntry", lambda d: d["spec"]["ports"][0].update(
        number="50051"), "'50051' is not of type"),
    "ALS sink type enum": (_EG, "EnvoyProxy", lambda d: _als(d).update(type="Als"), "Als"),
    "ALS log type enum": (_EG, "EnvoyProxy", lambda d: _als(d)["als"].update(type="Http"),
                          "Http"),
    "ALS backend port range": (_EG, "EnvoyProxy", lambda d: _als(d)["als"]["backendRefs"][
        0].update(port=70000), "70000"),
}


def _lax_errors(doc: Doc) -> list[str]:
    """Plain jsonschema on the CRD's schema, as it comes: what a lax validator reports."""
    schema = _crd_schema(doc)
    assert isinstance(schema, dict)
    return [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]


@pytest.mark.parametrize("case", list(_UNKNOWN_FIELDS))
def test_unknown_field_fails_where_a_lax_validator_passes(case: str) -> None:
    path, kind, breaks, named = _UNKNOWN_FIELDS[case]
    doc = _shipped(path, kind)
    breaks(doc)
    assert _lax_errors(doc) == []  # so only the strictness catches it
    errors = schema_errors(doc)
    assert len(errors) == 1 and named in errors[0], errors


@pytest.mark.parametrize("case", list(_BAD_VALUES))
def test_bad_value_fails_where_the_structural_check_passed(case: str) -> None:
    path, kind, breaks, named = _BAD_VALUES[case]
    doc = _shipped(path, kind)
    breaks(doc)
    # what test_deploy_k8s checked of custom resources before their schemas were vendored
    assert doc["apiVersion"] and doc["metadata"]["name"]
    errors = schema_errors(doc)
    assert len(errors) == 1 and named in errors[0], errors


def test_free_form_nodes_and_maps_stay_open() -> None:
    """preserve-unknown-fields and additionalProperties maps admit any key, as on the server."""
    doc = _shipped(_INGRESS, "EnvoyFilter")
    _filter(doc)["patch"]["value"]["typed_config"]["not_an_envoy_field"] = {"x": 1}
    doc["spec"]["workloadSelector"]["labels"]["any.label/key"] = "v"
    doc["metadata"]["annotations"] = {"example.com/anything": "v"}
    doc["status"] = {"observedGeneration": "3", "anything": True}  # status keeps unknown fields
    assert schema_errors(doc) == []


@pytest.mark.parametrize("value, ok", [(3, True), ("3", True), (3.5, False), (True, False),
                                       ([3], False)], ids=repr)
def test_int_or_string(value: Any, ok: bool) -> None:
    doc = _shipped(_INGRESS, "EnvoyFilter")
    doc["status"] = {"observedGeneration": value}  # anyOf integer|string + int-or-string
    assert (schema_errors(doc) == []) is ok
    bare = strict({"x-kubernetes-int-or-string": True})  # the extension alone
    assert K8sValidator(bare).is_valid(value) is ok


def test_list_types_nullable_and_embedded_resources() -> None:
    schema = strict({"type": "object", "properties": {
        "set": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
        "map": {"type": "array", "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object", "properties": {"name": {"type": "string"},
                                                           "v": {"type": "integer"}}}},
        "atomic": {"type": "array", "x-kubernetes-list-type": "atomic",
                   "items": {"type": "string"}},
        "maybe": {"type": "string", "nullable": True},
        "never": {"type": "string"},
        "object": {"type": "object", "x-kubernetes-embedded-resource": True,
                   "properties": {"spec": {"type": "object"}}},
    }})
    check = K8sValidator(schema).is_valid
    assert check({"set": ["a", "b"], "map": [{"name": "a", "v": 1}, {"name": "b", "v": 1}],
                  "atomic": ["a", "a"], "maybe": None,
                  "object": {"apiVersion": "v1", "kind": "K", "metadata": {}, "spec": {}}})
    assert not check({"set": ["a", "a"]})
    assert not check({"map": [{"name": "a", "v": 1}, {"name": "a", "v": 2}]})
    assert not check({"never": None})
    assert not check({"object": {"spec": {"unknown": 1}}})  # an empty object schema prunes all
    assert not check({"map": [{"name": "a", "value": 1}]})


def test_vendored_crds_are_the_upstream_files() -> None:
    """Each file's git blob id (uncompressed) is the one its row in tests/data/README.md records."""
    rows = (ROOT / "tests" / "data" / "README.md").read_text().splitlines()
    files = sorted(CRDS.glob("*.yaml.gz"))
    assert files
    for path in files:
        data = gzip.decompress(path.read_bytes())
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
        (row,) = [r for r in rows if f"`crds/{path.name}`" in r]
        assert f"`{blob}`" in row, (path.name, blob)
