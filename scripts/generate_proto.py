"""Generate the Python code for proto/milter_bridge/v1 into bridge/milter_bridge/v1.

The one way to produce the checked-in generated code. It uses the exactly
pinned dev dependencies (grpcio-tools for protoc and the gRPC plugin,
mypy-protobuf for the .pyi stubs), so the output is reproducible;
tests/test_generated_code.py regenerates into a temporary folder and fails
on any drift.

    python scripts/generate_proto.py            # write into bridge/
    python scripts/generate_proto.py --out DIR  # write elsewhere (the drift test)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("milter_bridge") / "v1"
INIT_TEXT = '"""Generated gRPC and protobuf code of the milter_bridge.v1 policy API."""\n'


def _plugin(name: str) -> str:
    """Find a protoc plugin installed next to this interpreter (mypy-protobuf's)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        msg = f"{name} not found: pip install -e '.[dev]' (mypy-protobuf provides it)"
        raise SystemExit(msg)
    return found


def generate(out: Path) -> list[Path]:
    """Write the generated modules under out/milter_bridge/v1 and return their paths."""
    target = out / PACKAGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    protos = sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    grpc_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{grpc_include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        msg = "protoc failed (its message is above)"
        raise SystemExit(msg)
    (target / "__init__.py").write_text(INIT_TEXT)
    (target / "py.typed").write_text("")
    return sorted(target.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bridge", help="source root to write into"
    )
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
