"""Regenerate the Python protobuf and gRPC stubs of protos/genserve/v1 with the pinned grpcio-tools."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

# clients/ and protos/ are siblings at the repository root; an editable install keeps this file there.
REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE = Path("genserve") / "v1"
GENERATED_ROOT = REPO_ROOT / "clients" / "generated"
# Patterns of the files protoc writes; anything else in the output folder (e.g. __init__.py) is ours.
GENERATED_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files of the genserve.v1 package, sorted."""
    folder = proto_root / PROTO_PACKAGE
    protos = sorted(folder.glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files in {folder} (codegen runs from a source checkout)")
    return protos


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every genserve/v1 .proto into out_dir (python, grpc, .pyi); return the files written, sorted.

    The include root is proto_root, so generated modules import each other as `genserve.v1.<name>_pb2`.
    """
    from grpc_tools import protoc  # dev-only dependency: imported here so clients need no grpcio-tools

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto shipped with grpcio-tools
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(path) for path in proto_files(proto_root)),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc exited with status {code}; arguments were {args[1:]}")
    return _generated_files(out_dir / PROTO_PACKAGE)


def _generated_files(folder: Path) -> list[Path]:
    """The protoc outputs present in folder, sorted."""
    return sorted(path for pattern in GENERATED_PATTERNS for path in folder.glob(pattern))


def stale_files(generated_root: Path = GENERATED_ROOT, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generated files under generated_root that differ from a fresh generation, are missing, or are extra."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {path.name: path for path in generate(Path(tmp), proto_root)}
        current = {path.name: path for path in _generated_files(generated_root / PROTO_PACKAGE)}
        names = sorted(fresh.keys() | current.keys())
        return [
            name
            for name in names
            if name not in fresh
            or name not in current
            or not filecmp.cmp(fresh[name], current[name], shallow=False)
        ]


def regenerate(generated_root: Path = GENERATED_ROOT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Regenerate generated_root in place, removing stubs of .proto files that no longer exist."""
    target = generated_root / PROTO_PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        for old in _generated_files(target):
            old.unlink()
        for path in fresh:
            shutil.copyfile(path, target / path.name)
    return _generated_files(target)


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate clients/generated in place, or with --check report stale stubs (exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m genserve.clients.codegen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the stubs are stale")
    parser.add_argument(
        "--out", type=Path, default=GENERATED_ROOT, help="generated root (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        if stale:
            print(f"stale generated stubs in {args.out / PROTO_PACKAGE}: {', '.join(stale)}", file=sys.stderr)
            print("run: python -m genserve.clients.codegen", file=sys.stderr)
            return 1
        print(f"generated stubs in {args.out / PROTO_PACKAGE} are current")
        return 0
    for path in regenerate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
