"""The package's metadata agrees with itself: the protoc that generates ext_proc/_gen, the
runtime floors that code needs, and one version everywhere it is shown."""

from __future__ import annotations

import re
import tomllib
from typing import Any, Final

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.version import Version

import ext_proc
from ext_proc.cli import main
from ext_proc.dev.devstack import ROOT
from ext_proc.telemetry.otel_env import build_resource

PYPROJECT: Final[dict[str, Any]] = tomllib.loads((ROOT / "pyproject.toml").read_text())
GENERATED: Final = ROOT / "ext_proc/_gen/envoy/service/ext_proc/v3"


def _requirement(name: str, listed: list[str]) -> Requirement:
    (found,) = [r for r in map(Requirement, listed) if r.name == name]
    return found


def test_make_proto_uses_the_grpcio_tools_the_build_hook_uses() -> None:
    build = _requirement("grpcio-tools", PYPROJECT["build-system"]["requires"])
    dev = _requirement("grpcio-tools", PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert str(build.specifier).startswith("=="), "pinned: generated code must not drift"
    assert build.specifier == dev.specifier


def test_runtime_protobuf_range_is_what_the_generated_code_needs() -> None:
    text = (GENERATED / "external_processor_pb2.py").read_text()
    gencode = Version(re.search(r"Protobuf Python Version: ([\d.]+)", text).group(1))  # type: ignore[union-attr]
    protobuf = _requirement("protobuf", PYPROJECT["project"]["dependencies"])
    # the generated modules refuse an older runtime and another major version
    assert sorted((s.operator, s.version) for s in protobuf.specifier) == [
        ("<", str(gencode.major + 1)), (">=", str(gencode))]

def test_runtime_grpcio_floor_is_what_the_generated_stubs_need() -> None:
    text = (GENERATED / "external_processor_pb2_grpc.py").read_text()
    generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", text).group(1)  # type: ignore[union-attr]
    grpcio = _requirement("grpcio", PYPROJECT["project"]["dependencies"])
    assert [(s.operator, s.version) for s in grpcio.specifier] == [(">=", generated)]


def test_envoy_config_dependency_is_a_runtime_one() -> None:
    runtime = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    assert "envoy-data-plane" in runtime


def test_one_version_everywhere() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "ext_proc.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    first = re.search(r"^## (\S+)", changelog, re.MULTILINE)
    assert first is not None and first.group(1) == ext_proc.__version__
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"extproc-otel, version {ext_proc.__version__}"


def test_service_version_defaults_to_the_package_version(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    attributes = build_resource().attributes
    assert attributes["service.version"] == ext_proc.__version__
    assert attributes["service.name"] == "extproc-otel"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.version=2026.12-canary")
    assert build_resource().attributes["service.version"] == "2026.12-canary"


def test_shipped_manifests_run_the_image_of_this_version() -> None:
    tags = set()
    for path in (ROOT / "envoy").rglob("*.yaml"):
        tags |= set(re.findall(r"image: extproc-otel:(\S+)", path.read_text()))
    assert tags == {ext_proc.__version__}
