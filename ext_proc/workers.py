"""``serve --workers N``: N sidecar processes on one port under a supervisor.

Each worker is a full sidecar (its own event loop, gRPC server, health service
and OTLP exporters) bound to the same address with ``SO_REUSEPORT``, so the
kernel spreads incoming *connections* over the workers. Envoy multiplexes every
ext_proc stream of one worker thread onto one HTTP/2 connection, so the Envoy
cluster must open several connections for the load to spread (see
``envoy/envoy-workers.yaml``).

The supervisor holds a bound, non-listening ``SO_REUSEPORT`` socket on the
port for its whole life: it resolves port 0 once, and nobody else can take the
port while a crashed worker is being restarted. It restarts a worker that
dies (with backoff when it keeps dying), and on SIGTERM/SIGINT sends SIGTERM to
every worker, waits for each to drain and exit, and exits 0 when all did. A
second signal kills the workers at once. Workers run in their own process
group (a terminal's Ctrl-C reaches only the supervisor, which forwards it once)
and die with the supervisor (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

from loguru import logger

from ext_proc.config import Settings
from ext_proc.config.core import split_host_port

EXIT_CANNOT_START: Final = 2  # what `serve` exits with on a bad config or a bind failure
_PR_SET_PDEATHSIG: Final = 1
_WORKER_CMD: Final = ("-c", "from ext_proc.workers import worker_main; worker_main()")


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff for a worker that keeps dying: doubles per quick death, resets after a
    worker stayed up `stable_s`."""

    initial_s: float = 0.1
    max_s: float = 5.0
    stable_s: float = 10.0

    def delay(self, previous_s: float, uptime_s: float) -> float:
        if uptime_s >= self.stable_s:
            return self.initial_s
        return min(self.max_s, max(self.initial_s, previous_s * 2))


def format_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind (without listening) a ``SO_REUSEPORT`` socket on `listen`; return it and the
    concrete ``HOST:PORT`` the workers bind (port 0 resolved). Raises OSError."""
    host, port = split_host_port(listen)
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock, format_listen(host, int(sock.getsockname()[1]))


def worker_settings(settings: Settings, listen: str, index: int) -> dict[str, Any]:
    """Worker `index`'s settings as a plain (picklable) dict: the resolved listen
    address, and the admin port offset by the index (port 0 stays 0)."""
    dump = settings.model_dump()
    dump["server"]["listen"] = listen
    admin = settings.admin.listen
    if admin is not None:
        host, port = split_host_port(admin)
        dump["admin"]["listen"] = format_listen(host, port + index if port else 0)
    return dump


@dataclass
class Worker:
    index: int
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # when a dead worker is due to restart
    backoff_s: float = 0.0
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Runs `settings.server.workers` workers until a signal; `run()` returns the exit code."""

    def __init__(self, settings: Settings, policy: RestartPolicy | None = None) -> None:
        self._settings = settings
        self._policy = policy or RestartPolicy()
        self.workers = [Worker(i) for i in range(settings.server.workers)]
        self._signals: list[int] = []
        self._listen = settings.server.listen

    def run(self) -> int:
        reservation, self._listen = reserve_port(self._settings.server.listen)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous_fd = signal.set_wakeup_fd(wake_w)
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        try:
            logger.info("supervisor started", listen=self._listen, workers=len(self.workers))
            for worker in self.workers:
                self._spawn(worker)
            code = self._loop(wake_r)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(wake_r)
            os.close(wake_w)
            reservation.close()
        logger.info("supervisor stopped", exit_code=code)
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _loop(self, wake_r: int) -> int:
        while not self._signals:
            fatal = self._reap()
            if fatal is not None:
                self._stop_all()
                return fatal
            self._restart_due()
            select.select([wake_r], [], [], self._next_timeout())
            _drain(wake_r)
        logger.info("stopping workers", signal=signal.Signals(self._signals[0]).name)
        return self._stop_all(wake_r)

    def _next_timeout(self) -> float:
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else 1.0

    def _spawn(self, worker: Worker) -> None:
        payload = {"index": worker.index, "parent_pid": os.getpid(),
                   "settings": worker_settings(self._settings, self._listen, worker.index)}
        popen = subprocess.Popen([sys.executable, *_WORKER_CMD], stdin=subprocess.PIPE,
                                 process_group=0)
        assert popen.stdin is not None
        with popen.stdin:
            popen.stdin.write(pickle.dumps(payload))
        worker.popen, worker.started_at, worker.restart_at = popen, time.monotonic(), None
        logger.info("worker started", worker=worker.index, pid=popen.pid)

    def _reap(self) -> int | None:
        """Notice dead workers and schedule their restart; a worker that cannot start
        (bad config, port taken) is fatal: return the exit code then."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.popen is None or (code := worker.popen.poll()) is None:
                continue
            worker.exit_codes.append(code)
            uptime = now - worker.started_at
            worker.popen = None
            if code == EXIT_CANNOT_START:
                logger.error("worker cannot start", worker=worker.index, exit_code=code)
                return EXIT_CANNOT_START
            worker.backoff_s = self._policy.delay(worker.backoff_s, uptime)
            worker.restart_at = now + worker.backoff_s
            logger.warning("worker died; restarting", worker=worker.index, exit_code=code,
                           uptime_s=round(uptime, 3), restart_in_s=worker.backoff_s)
        return None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is not None and worker.restart_at <= now:
                self._spawn(worker)

    def _stop_all(self, wake_r: int | None = None) -> int:
        """SIGTERM every live worker and wait for them; a further signal (or the grace
        period plus a margin running out) kills the rest. 0 when all exited 0."""
        live = [w.popen for w in self.workers if w.popen is not None]
        for popen in live:
            popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._settings.server.grace_s + 5.0
        handled = len(self._signals)
        while any(p.poll() is None for p in live):
            if len(self._signals) > handled or time.monotonic() > deadline:
                logger.warning("killing workers", reason="second signal or timeout")
                for popen in live:
                    if popen.poll() is None:
                        popen.kill()
                handled = len(self._signals)
                deadline = time.monotonic() + 5.0
            if wake_r is not None:
                select.select([wake_r], [], [], 0.1)
                _drain(wake_r)
            else:
                time.sleep(0.05)
        codes = [p.wait() for p in live]
        return 0 if all(c == 0 for c in codes) else 1


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        return


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM us when the supervisor dies; exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        sys.exit(0)


def worker_main() -> None:
    """Entry point of one worker process: settings arrive pickled on stdin."""

    from ext_proc.app import run
    from ext_proc.policy.sampling import RulesFileError
    from ext_proc.telemetry.logs import configure_logging
    from ext_proc.telemetry.otel_env import TelemetryConfigError

    payload = pickle.load(sys.stdin.buffer)
    _die_with_parent(int(payload["parent_pid"]))
    settings = Settings(**payload["settings"])
    configure_logging(settings.log)
    logger.configure(extra={"worker": int(payload["index"])})
    try:
        run(settings)
    except (TelemetryConfigError, RulesFileError, OSError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        sys.exit(EXIT_CANNOT_START)


def supervise(settings: Settings) -> int:
    """Run the workers until SIGTERM/SIGINT; the process exit code."""
    try:
        return Supervisor(settings).run()
    except OSError as exc:
        print(f"cannot start: cannot listen on {settings.server.listen}: {exc}",
              file=sys.stderr)
        return EXIT_CANNOT_START
