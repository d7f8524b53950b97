"""Load generators: ``wrk`` for closed-loop saturation, a paced client for light load.

wrk cannot hold a rate, so the light load comes from a small asyncio client that
starts one request every ``1/rate`` seconds over a few keep-alive connections and
times each from its write to the end of its response.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# wrk's Lua `done` hook prints one JSON line we can parse instead of its text report.
_WRK_LUA: Final = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"socket_errors":%d,"non2xx":%d,'
    .. '"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99)))
end
"""
_MARK: Final = "BENCH_JSON "
# With a cap, each thread stops after its share of requests (its own Lua state counts).
_WRK_CAP_LUA: Final = _WRK_LUA + """
local cap, count = 0, 0
init = function(args) cap = tonumber(args[1]) or 0 end
response = function(status, headers, body)
  count = count + 1
  if cap > 0 and count >= cap then wrk.thread:stop() end
end
"""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    errors: int  # socket errors plus non-2xx answers
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError("no wrk binary: apt-get install wrk (make bench does)")
    return found


def run_wrk(url: str, seconds: float, workdir: Path, threads: int = 2,
            connections: int = 32, max_requests: int = 0) -> LoadResult:
    """Closed loop: `connections` keep-alive connections each sending back to back.

    With `max_requests`, each of the `threads` stops after its share of them (wrk
    itself still runs for `seconds`); the count can pass the cap by the requests
    in flight when a thread stops.
    """
    capped = max_requests > 0
    script = workdir / ("report-capped.lua" if capped else "report.lua")
    if not script.exists():
        script.write_text(_WRK_CAP_LUA if capped else _WRK_LUA)
    cmd = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
           "-s", str(script), url]
    if capped:
        cmd += ["--", str(max(1, max_requests // threads))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                          check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(_MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    doc = json.loads(line.removeprefix(_MARK))
    return LoadResult(doc["requests"], doc["duration_us"] / 1e6,
                      doc["socket_errors"] + doc["non2xx"],
                      doc["p50_us"] / 1000, doc["p99_us"] / 1000)


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[
        min(998, max(0, round(q * 1000) - 1))]


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, request: bytes) -> bool:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length:
            await self.reader.readexactly(length)
        return head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2"))


async def _paced(host: str, port: int, path: str, rate: float, seconds: float,
                 connections: int) -> LoadResult:
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    pool: asyncio.Queue[_Conn] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(_Conn(*await asyncio.open_connection(host, port)))
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        conn = await pool.get()
        started = time.perf_counter()
        try:
            ok = await conn.get(request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn = _Conn(*await asyncio.open_connection(host, port))
        else:
            latencies.append((time.perf_counter() - started) * 1000)
            errors += not ok
        pool.put_nowait(conn)

    loop = asyncio.get_running_loop()
    total = max(1, int(rate * seconds))
    begin = loop.time()
    tasks = []
    for i in range(total):
        delay = begin + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - begin
    while not pool.empty():
        pool.get_nowait().writer.close()
    return LoadResult(len(latencies), elapsed, errors, percentile(latencies, 0.5),
                      percentile(latencies, 0.99))


def run_paced(url_host: str, port: int, path: str, rate: float, seconds: float,
              connections: int = 4) -> LoadResult:
    """Open loop at `rate` requests/s for `seconds`; latency per request."""
    return asyncio.run(_paced(url_host, port, path, rate, seconds, connections))
