"""Generate the Python stubs for proto/flywheel_proto/v1/*.proto (one command: `make proto`).

Proto paths mirror the package, so generated imports (`from flywheel_proto.v1 import ...`)
resolve with no post-processing. `--check` regenerates into a temporary folder and fails if the
committed stubs differ, so CI catches a contract edited without regenerating.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = PROTO_ROOT / "flywheel_proto" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    protos = sorted(PACKAGE.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    return [out / "flywheel_proto" / "v1" / (p.stem + s) for p in protos for s in SUFFIXES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    args = parser.parse_args()
    if not args.check:
        files = generate(PROTO_ROOT)
        print("generated " + ", ".join(f.name for f in files))
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [
            f.name
            for f in fresh
            if not (PACKAGE / f.name).exists()
            or not filecmp.cmp(f, PACKAGE / f.name, shallow=False)
        ]
    if stale:
        sys.exit(f"generated stubs are out of date: {', '.join(stale)}; run `make proto`")
    print("proto stubs up to date")


if __name__ == "__main__":
    main()
