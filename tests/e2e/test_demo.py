"""`make demo` (the README's first command) as a user runs it: the embedded stack, the
requests it sends, the trace trees it prints, a clean stop."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ext_proc.dev.demo.__main__ import DELAY_MS, DELAYED_PATH
from ext_proc.dev.devstack import ROOT

pytestmark = pytest.mark.e2e


def test_the_demo_prints_clean_traces_with_phases_and_stops() -> None:
    done = subprocess.run([sys.executable, "-m", "ext_proc.dev.demo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, check=False)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert out.rstrip().endswith("stopped cleanly."), out[-2000:]
    lines = out.splitlines()
    (server_at,) = [i for i, line in enumerate(lines)
                    if f"GET {DELAYED_PATH}  SERVER" in line]
    # the client reads every response whole: no request of the demo looks aborted
    assert "ERROR" not in lines[server_at], lines[server_at]
    tree = lines[server_at:server_at + 12]
    filters = next(line for line in tree if "filters  INTERNAL" in line)
    found = re.search(r"filters  INTERNAL  ([\d.]+) ms", filters)
    assert found is not None and float(found.group(1)) >= DELAY_MS * 0.9, filters
    assert any("envoy.phase=upstream" in line and "CLIENT" in line for line in tree), tree
    assert any("response  INTERNAL" in line for line in tree), tree
    assert "response_incomplete" not in out, out
