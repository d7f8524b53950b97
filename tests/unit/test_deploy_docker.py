"""Dockerfile: checked statically (no Docker engine here), and its parts run for real.

The HEALTHCHECK command runs against a real sidecar; the build stage's steps
(generate protos, build the wheel) run in a scratch copy of the build context.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from ext_proc.devstack import ROOT, Proc, free_port, grpc_serving, wait_until

DOCKERFILE: Final = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str


def _instructions() -> list[Instruction]:
    lines, joined = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not joined and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            joined += raw.rstrip()[:-1] + " "
            continue
        lines.append(joined + raw)
        joined = ""
    parsed = []
    for line in lines:
        op, _, args = line.strip().partition(" ")
        parsed.append(Instruction(op.upper(), args.strip()))
    return parsed


def _stages() -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for ins in _instructions():
        if ins.op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _args() -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in _instructions() if i.op == "ARG" and "=" in i.args)


def _env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.op == "ENV":
            env.update(dict(tok.split("=", 1) for tok in shlex.split(ins.args)))
    return env


def _exec_form(args: str) -> list[str]:
    value: list[str] = json.loads(args)
    return value


def test_base_is_slim_python_311_for_every_stage() -> None:
    args = _args()
    for stage in _stages():
        image = stage[0].args.split()[0]
        image = args.get(image.strip("${}"), image)
        assert image.startswith("python:3.11-slim"), image


def test_final_stage_runs_as_non_root_with_a_read_only_friendly_env() -> None:
    final = _stages()[-1]
    users = [i.args for i in final if i.op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = _env(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp"
    assert [i.args for i in final if i.op == "WORKDIR"][-1] == "/tmp"


def test_cmd_is_the_project_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (cmd,) = [i for i in _stages()[-1] if i.op == "CMD"]
    assert _exec_form(cmd.args)[:2] == [next(iter(scripts)), "serve"]


def _dockerignored(rel: str) -> bool:
    ignored = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(rel, pattern) or rel.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    copies = [i for stage in _stages() for i in stage if i.op == "COPY" and "--from" not in i.args]
    assert copies
    for ins in copies:
        *sources, _dest = ins.args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not _dockerignored(source), f"{source} is excluded by .dockerignore"
    assert _dockerignored("ext_proc/_gen") and _dockerignored(".venv")


def test_build_stage_generates_the_protos() -> None:
    runs = " ".join(i.args for i in _stages()[0] if i.op == "RUN")
    assert "proto/generate.py" in runs and "grpcio-tools" in runs


def _healthcheck_code() -> list[str]:
    (check,) = [i for i in _stages()[-1] if i.op == "HEALTHCHECK"]
    options, _, cmd = check.args.partition("CMD ")
    assert "--interval" in options and "--timeout" in options
    return _exec_form(cmd)


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
    env = {**os.environ, **_env(_stages()[-1]), "EXTPROC_HEALTH_TARGET": target}
    return subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True,
                          timeout=30, check=False).returncode


def test_healthcheck_passes_against_a_serving_sidecar(sidecar: str) -> None:
    assert _run_healthcheck(sidecar) == 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    assert _run_healthcheck(f"127.0.0.1:{free_port()}") != 0


def test_build_stage_produces_a_wheel_with_generated_protos(tmp_path: Path) -> None:
    """The build stage's steps, in a scratch copy of the (dockerignore-filtered) context."""
    context = tmp_path / "src"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    ignore = shutil.ignore_patterns("_gen", "__pycache__", "*.pyc")
    shutil.copytree(ROOT / "proto", context / "proto", ignore=ignore)
    shutil.copytree(ROOT / "ext_proc", context / "ext_proc", ignore=ignore)
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=context, capture_output=True,
                              text=True, timeout=300, check=False)

    gen = run("proto/generate.py")
    assert gen.returncode == 0, gen.stderr
    wheel = run("-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--wheel-dir", str(tmp_path / "w"), ".")
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    (built,) = (tmp_path / "w").glob("*.whl")
    names = zipfile.ZipFile(built).namelist()
    assert any(n.endswith("external_processor_pb2.py") for n in names)
    assert any(n.endswith("external_processor_pb2_grpc.py") for n in names)
