"""CPU time of a process tree from /proc, and the machine the bench ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

_PROC: Final = Path("/proc")
_TICKS: Final = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields after the command name of /proc/<pid>/stat (state first), or None."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in (_PROC / str(pid) / "task").glob("*/children"):
        try:
            found.extend(int(p) for p in task.read_text().split())
        except OSError:
            continue
    return found


def tree_pids(root: int) -> list[int]:
    """`root` and all its live descendants."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of `root` and its live descendants (threads included)."""
    total = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None and len(fields) > 12:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


@dataclass(frozen=True)
class Machine:
    nproc: int
    cpu: str
    kernel: str
    python: str
    envoy: str
    date: str

    def line(self) -> str:
        return (f"{self.nproc} x {self.cpu}, Linux {self.kernel}, Python {self.python}, "
                f"{self.envoy}; {self.date}")


def machine(envoy: str) -> Machine:
    envoy_version = _version([envoy, "--version"]).rpartition("version: ")[2] or "unknown"
    return Machine(
        nproc=os.cpu_count() or 1, cpu=_cpu_model(), kernel=platform.release(),
        python=sys.version.split()[0], envoy=f"Envoy {envoy_version.split('/')[1]}"
        if envoy_version.count("/") >= 2 else f"Envoy {envoy_version}",
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
