"""What users install, installed the way they install it.

- The wheel is built by the Dockerfile's own build-stage command, run in a copy of the
  Docker build context (the files of a clean checkout, .dockerignore applied), and
  installed with the final stage's own `pip install` command.
- The sdist is built with `python -m build --sdist` from a clean checkout (the files git
  tracks, or would: nothing generated, no venv) and installed with `pip install`, which
  builds a wheel from it again.

Each goes into a fresh venv, run from a scratch directory so the repo is not on
sys.path. Then, from that venv only: `--version`, every `envoy-config` format (Envoy
validates the bootstrap and the snippet), and `serve` behind a real Envoy running the
bootstrap that same CLI printed, until a span reaches a real OTLP receiver.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

import ext_proc
from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import (
    ROOT,
    Proc,
    envoy_binary,
    free_port,
    grpc_serving,
    http_ok,
    wait_until,
)
from ext_proc.envoy_config.embed import envoy_configs, envoy_validate, is_bootstrap
from tests.dockerfile import build_context, run_commands, stages
from tests.e2e.conftest import bootstrap_on_free_ports

pytestmark = pytest.mark.e2e

VERSION: Final = ext_proc.__version__
FORMATS: Final = ("bootstrap", "snippet", "istio", "envoy-gateway")
GENERATED: Final = "ext_proc/_gen/envoy/service/ext_proc/v3/external_processor_pb2.py"
BUILD_TIMEOUT_S: Final = 600


def _clean_env() -> dict[str, str]:
    """The caller's environment less what would leak the dev venv or the repo in."""
    drop = ("OTEL_", "EXTPROC_", "PYTHON", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _run(cmd: list[str], cwd: Path, timeout: float = BUILD_TIMEOUT_S
         ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def checkout_files() -> list[str]:
    """The files of a clean checkout: tracked, plus new ones not ignored (so the test
    also covers work not yet committed)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [rel for rel in listed.splitlines() if (ROOT / rel).is_file()]


def _pip(command: list[str]) -> list[str]:
    """A Dockerfile `pip ...` command, run by this interpreter's pip."""
    assert command[0] == "pip", command
    return [sys.executable, "-m", "pip", *command[1:]]


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    files = checkout_files()
    assert GENERATED not in files, "a clean checkout has no generated code"
    work = tmp_path_factory.mktemp("artifacts")
    context = build_context(files, ROOT, work / "context")
    (build_cmd,) = run_commands(stages()[0])  # pip wheel --no-deps --wheel-dir /wheels .
    wheels = work / "wheels"
    _run([part.replace("/wheels", str(wheels)) for part in _pip(build_cmd)], context)
    checkout = work / "checkout"
    for rel in files:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_bytes((ROOT / rel).read_bytes())
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(work / "sdist"), "."],
         checkout)
    (wheel,) = wheels.glob("extproc_otel-*.whl")
    (sdist,) = (work / "sdist").glob("extproc_otel-*.tar.gz")
    return Built(wheel, sdist)


def test_both_artifacts_carry_the_generated_protos_and_the_version(built: Built) -> None:
    assert built.wheel.name.startswith(f"extproc_otel-{VERSION}-")
    assert built.sdist.name == f"extproc_otel-{VERSION}.tar.gz"
    in_wheel = set(zipfile.ZipFile(built.wheel).namelist())
    assert GENERATED in in_wheel
    assert GENERATED.replace("_pb2.py", "_pb2_grpc.py") in in_wheel
    assert not any(n.startswith(("tests/", "proto/", ".venv")) for n in in_wheel)
    with tarfile.open(built.sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (GENERATED, "proto/generate.py", "setup.py", "CHANGELOG.md",
                   "proto/envoy/service/ext_proc/v3/external_processor.proto"):
        assert needed in in_sdist, needed


@dataclass(frozen=True)
class Installed:
    kind: str
    venv: Path
    scratch: Path

    @property
    def cli(self) -> str:
        return str(self.venv / "bin" / "extproc-otel")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([self.cli, *args], self.scratch, timeout=60)


@pytest.fixture(scope="module", params=["wheel", "sdist"])
def installed(request: pytest.FixtureRequest, built: Built,
              tmp_path_factory: pytest.TempPathFactory) -> Installed:
    home = tmp_path_factory.mktemp(f"venv-{request.param}")
    venv, scratch = home / "venv", home / "scratch"
    scratch.mkdir()
    _run([sys.executable, "-m", "venv", str(venv)], home)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if request.param == "wheel":
        (install,) = [c for c in run_commands(stages()[-1]) if c[:2] == ["pip", "install"]]
        assert install[2:] == ["/wheels/*.whl"]
        _run([*pip, str(built.wheel)], scratch)
    else:
        _run([*pip, str(built.sdist)], scratch)
    return Installed(request.param, venv, scratch)


def test_the_package_comes_from_the_venv_not_the_checkout(installed: Installed) -> None:
    probe = ("import ext_proc, ext_proc._gen.envoy.service.ext_proc.v3.external_processor_pb2"
             " as m; print(ext_proc.__file__); print(m.__file__)")
    out = _run([str(installed.venv / "bin" / "python"), "-c", probe], installed.scratch)
    for line in out.stdout.split():
        assert Path(line).is_relative_to(installed.venv), line
        assert not Path(line).is_relative_to(ROOT), line


def test_version(installed: Installed) -> None:
    assert installed.run("--version").stdout.strip() == f"extproc-otel, version {VERSION}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_envoy_config_prints_each_format_and_envoy_accepts_it(installed: Installed,
                                                              fmt: str) -> None:
    text = installed.run("envoy-config", "--format", fmt,
                         "--sidecar-address", f"127.0.0.1:{free_port()}").stdout
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert docs, f"--format {fmt} printed nothing"
    configs = [c for doc in docs for c in envoy_configs(doc)]
    if fmt in ("bootstrap", "snippet"):
        assert configs, f"no Envoy config in --format {fmt}"
    for config in configs:
        verdict = envoy_validate(config, envoy_binary())
        assert verdict.ok, verdict.output[-2000:]


def _bootstrap_on_free_ports(text: str, upstream: int) -> tuple[dict[str, Any], int, int]:
    """The printed bootstrap with its listener, admin and app ports moved to free ones."""
    config: dict[str, Any] = yaml.safe_load(text)
    assert is_bootstrap(config)
    return bootstrap_on_free_ports(config, upstream)


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    rx = OtlpReceiver()
    rx.start()
    yield rx
    rx.stop()


def test_serve_behind_envoy_sends_a_span(installed: Installed, otlp: OtlpReceiver) -> None:
    sidecar_port, users_port = free_port(), free_port()
    printed = installed.run("envoy-config", "--format", "bootstrap",
                            "--sidecar-address", f"127.0.0.1:{sidecar_port}").stdout
    config, listener, admin = _bootstrap_on_free_ports(printed, users_port)
    envoy_yaml = installed.scratch / "envoy.yaml"
    envoy_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**_clean_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRICS_EXPORTER": "none"}
    logs = installed.scratch
    procs = [
        Proc("users", [sys.executable, "-m", "ext_proc.dev.demo.users_service", "--listen",
                       f"127.0.0.1:{users_port}", "--db", str(logs / "users.db")],
             logs / "users.log", {**_clean_env(), "OTEL_TRACES_EXPORTER": "none",
                                  "OTEL_METRICS_EXPORTER": "none"}),
        Proc("sidecar", [installed.cli, "serve", "--listen", f"127.0.0.1:{sidecar_port}"],
             logs / "sidecar.log", env, cwd=installed.scratch),
        Proc("envoy", [envoy_binary(), "-c", str(envoy_yaml), "--disable-hot-restart",
                       "--log-level", "warn", "--concurrency", "1"], logs / "envoy.log"),
    ]
    try:
        for proc in procs:
            proc.start()
        sidecar = procs[1]

        def serving() -> bool:
            assert sidecar.alive(), f"the installed sidecar exited:\n{sidecar.output()[-3000:]}"
            return grpc_serving(f"127.0.0.1:{sidecar_port}")

        wait_until(serving, 30, "the installed sidecar to serve")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{users_port}/healthz"), 30, "users")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "envoy")
        assert http_ok(f"http://127.0.0.1:{listener}/api/users/1")
        arrived = otlp.wait_for(lambda: any(
            s.attributes.get("http.route") == "/api/users/{id}" for s in otlp.spans()), 15)
        assert arrived, f"no span from the installed sidecar:\n{sidecar.output()[-3000:]}"
        (span,) = [s for s in otlp.spans() if s.attributes.get("http.route") == "/api/users/{id}"]
        assert span.resource["service.name"] == "extproc-otel"
        assert span.resource["service.version"] == VERSION
        assert span.attributes["http.response.status_code"] == 200
    finally:
        codes = [proc.stop() for proc in reversed(procs)]
    assert codes[1] == 0, f"the installed sidecar did not drain and exit 0: {codes}"
