"""Build hook: every wheel and sdist carries the protobuf modules generated from proto/.

ext_proc/_gen is not in git (protobuf asks that gencode not be checked in, and the
.proto files stay the one source). setuptools runs this file for every build step
(sdist, wheel, editable), and it regenerates ext_proc/_gen with the grpcio-tools pinned
in pyproject's build-system.requires before the package list is read, so the
generated packages are found and shipped like any other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup

GENERATOR = Path(__file__).resolve().parent / "proto" / "generate.py"

if GENERATOR.is_file():  # a source tree or an sdist (a built wheel has no setup.py)
    spec = importlib.util.spec_from_file_location("_extproc_generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.main() != 0:
        raise SystemExit("proto/generate.py failed: ext_proc/_gen cannot be built")

setup()
