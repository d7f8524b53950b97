"""The Dockerfile read as Docker reads it: instructions, stages, ENV and .dockerignore.

Shared by the static checks (tests/unit/deploy/test_deploy_docker.py) and the built-artifact
test (tests/e2e/test_artifacts.py), which runs the build stage's own commands.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ext_proc.dev.devstack import ROOT

DOCKERFILE: Final = ROOT / "Dockerfile"
DOCKERIGNORE: Final = ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str


def instructions() -> list[Instruction]:
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


def stages() -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for ins in instructions():
        if ins.op == "FROM":
            found.append([])
        if found:
            found[-1].append(ins)
    return found


def build_args() -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in instructions() if i.op == "ARG" and "=" in i.args)


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.op == "ENV":
            env.update(dict(tok.split("=", 1) for tok in shlex.split(ins.args)))
    return env


def exec_form(args: str) -> list[str]:
    value: list[str] = json.loads(args)
    return value


def run_commands(stage: list[Instruction]) -> list[list[str]]:
    """Each shell command of the stage's RUN instructions (split at `&&`), as argv."""
    commands = []
    for ins in stage:
        if ins.op == "RUN":
            for part in ins.args.split("&&"):
                commands.append(shlex.split(part))
    return commands


def dockerignored(rel: str) -> bool:
    ignored = False
    for pattern in DOCKERIGNORE.read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            if fnmatch.fnmatch(Path(rel).name, pattern[3:]) or any(
                    fnmatch.fnmatch(part, pattern[3:]) for part in Path(rel).parts):
                ignored = not negate
            continue
        if fnmatch.fnmatch(rel, pattern) or rel.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def build_context(files: list[str], source: Path, dest: Path) -> Path:
    """The Docker build context of `files` (relative to `source`): .dockerignore applied."""
    for rel in files:
        if not dockerignored(rel):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, dest / rel)
    return dest
