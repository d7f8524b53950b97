"""Dockerfile: checked statically (no Docker engine here), and its parts run for real.

The HEALTHCHECK command runs against a real sidecar; the build stage's command and the
final stage's install run on the built artifacts in tests/e2e/test_artifacts.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator

import pytest

from ext_proc.dev.devstack import ROOT, Proc, free_port, grpc_serving, wait_until
from tests.dockerfile import build_args, dockerignored, env_of, exec_form, run_commands, stages


def test_base_is_slim_python_311_for_every_stage() -> None:
    args = build_args()
    for stage in stages():
        image = stage[0].args.split()[0]
        image = args.get(image.strip("${}"), image)
        assert image.startswith("python:3.11-slim"), image


def test_final_stage_runs_as_non_root_with_a_read_only_friendly_env() -> None:
    final = stages()[-1]
    users = [i.args for i in final if i.op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = env_of(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp"
    assert [i.args for i in final if i.op == "WORKDIR"][-1] == "/tmp"


def test_cmd_is_the_project_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (cmd,) = [i for i in stages()[-1] if i.op == "CMD"]
    assert exec_form(cmd.args)[:2] == [next(iter(scripts)), "serve"]


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    copies = [i for stage in stages() for i in stage if i.op == "COPY" and "--from" not in i.args]
    assert copies
    for ins in copies:
        *sources, _dest = ins.args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not dockerignored(source), f"{source} is excluded by .dockerignore"
    assert dockerignored("ext_proc/_gen") and dockerignored(".venv")


def test_build_stage_builds_the_wheel_with_the_projects_build_hook() -> None:
    """One command builds the wheel; grpcio-tools comes from build-system.requires and
    setup.py generates the protos (no separate protoc step that a user's build lacks)."""
    commands = run_commands(stages()[0])
    assert commands == [["pip", "wheel", "--no-deps", "--wheel-dir", "/wheels", "."]]
    copied = " ".join(i.args for i in stages()[0] if i.op == "COPY")
    for needed in ("setup.py", "MANIFEST.in", "proto", "ext_proc", "pyproject.toml"):
        assert needed in copied.split(), needed


def test_final_stage_installs_only_the_wheel() -> None:
    installs = [c for c in run_commands(stages()[-1]) if c[:2] == ["pip", "install"]]
    assert installs == [["pip", "install", "/wheels/*.whl"]]


def _healthcheck_code() -> list[str]:
    (check,) = [i for i in stages()[-1] if i.op == "HEALTHCHECK"]
    options, _, cmd = check.args.partition("CMD ")
    assert "--interval" in options and "--timeout" in options
    return exec_form(cmd)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    target = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EXTPROC_"))}
    env.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none",
               OTEL_LOGS_EXPORTER="none")
    proc = Proc("sidecar", [sys.executable, "-m", "ext_proc", "serve", "--listen", target],
                tmp_path_factory.mktemp("hc") / "sidecar.log", env)
    proc.start()
    try:
        wait_until(lambda: proc.alive() and grpc_serving(target), 30, "sidecar")
        yield target
    finally:
        proc.stop()


def _run_healthcheck(target: str) -> int:
    cmd = _healthcheck_code()
    assert cmd[0] == "python"
    env = {**os.environ, **env_of(stages()[-1]), "EXTPROC_HEALTH_TARGET": target}
    return subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True,
                          timeout=30, check=False).returncode


def test_healthcheck_passes_against_a_serving_sidecar(sidecar: str) -> None:
    assert _run_healthcheck(sidecar) == 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    assert _run_healthcheck(f"127.0.0.1:{free_port()}") != 0
