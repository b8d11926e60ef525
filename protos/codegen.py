"""Regenerate the Python protobuf and gRPC stubs of protos/genserve/{v1,oip} with the pinned grpcio-tools.

genserve.oip (the Open Inference Protocol, protobuf package ``inference``) defines the same protobuf symbols as
tritonclient's and KServe's stubs; in protobuf's default descriptor pool two such modules cannot be imported
into one process ("duplicate symbol 'inference.DataType'"). Its generated modules therefore register their
descriptors in a pool of their own, ``genserve.oip.POOL`` (one line of each generated file is rewritten here),
so a server and a tritonclient can share a process (tests, notebooks). The wire format is unaffected.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

# This file lives in protos/ (genserve.protos); an editable install keeps it there. The stubs are written beside
# their .proto files, so protos/genserve/v1 is both the contract and the package genserve.v1 that every station
# imports.
PROTO_ROOT = Path(__file__).resolve().parent
PROTO_PACKAGES = (Path("genserve") / "v1", Path("genserve") / "oip")
"""Proto folders under protos/, each compiled into the same folder (stubs beside their .proto files)."""
PROTO_PACKAGE = PROTO_PACKAGES[0]
PRIVATE_POOL = {Path("genserve") / "oip": "genserve.oip"}
"""Packages whose descriptors go to ``<module>.POOL`` instead of protobuf's default pool (see above)."""
_DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
GENERATED_ROOT = PROTO_ROOT
# Patterns of the files protoc writes; anything else in the output folder (e.g. __init__.py) is ours.
GENERATED_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT, package: Path = PROTO_PACKAGE) -> list[Path]:
    """The .proto files of one package folder (default genserve/v1), sorted."""
    folder = proto_root / package
    protos = sorted(folder.glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files in {folder} (codegen runs from a source checkout)")
    return protos


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT, package: Path = PROTO_PACKAGE) -> list[Path]:
    """Compile one package's .proto files into out_dir (python, grpc, .pyi); return the files written, sorted.

    The include root is proto_root, so generated modules import each other as `genserve.v1.<name>_pb2`
    (`genserve.oip.<name>_pb2` for package genserve/oip).
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
        *(str(path) for path in proto_files(proto_root, package)),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc exited with status {code}; arguments were {args[1:]}")
    files = _generated_files(out_dir / package)
    if package in PRIVATE_POOL:
        for path in files:
            if path.name.endswith("_pb2.py"):
                _use_private_pool(path, PRIVATE_POOL[package])
    return files


def _use_private_pool(path: Path, module: str) -> None:
    """Make a generated _pb2.py register its descriptors in ``<module>.POOL`` instead of the default pool."""
    text = path.read_text()
    if text.count(_DEFAULT_POOL_LINE) != 1:
        raise RuntimeError(f"{path}: expected one line starting {_DEFAULT_POOL_LINE!r} in protoc's output; "
                           "the generated code changed, update genserve.protos.codegen")
    line = f"from {module} import POOL as _POOL  # genserve codegen: a pool of its own, not the default\n"
    path.write_text(text.replace(_DEFAULT_POOL_LINE, line + "DESCRIPTOR = _POOL.AddSerializedFile("))


def _generated_files(folder: Path) -> list[Path]:
    """The protoc outputs present in folder, sorted."""
    return sorted(path for pattern in GENERATED_PATTERNS for path in folder.glob(pattern))


def stale_files(generated_root: Path = GENERATED_ROOT, proto_root: Path = PROTO_ROOT,
                packages: tuple[Path, ...] = PROTO_PACKAGES) -> list[str]:
    """Names of generated files under generated_root (every package; names are unique across packages) that
    differ from a fresh generation, are missing, or are extra; sorted."""
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for package in packages:
            fresh = {path.name: path for path in generate(Path(tmp), proto_root, package)}
            current = {path.name: path for path in _generated_files(generated_root / package)}
            stale += [
                name
                for name in fresh.keys() | current.keys()
                if name not in fresh
                or name not in current
                or not filecmp.cmp(fresh[name], current[name], shallow=False)
            ]
    return sorted(stale)


def regenerate(generated_root: Path = GENERATED_ROOT, proto_root: Path = PROTO_ROOT,
               packages: tuple[Path, ...] = PROTO_PACKAGES) -> list[Path]:
    """Regenerate every package under generated_root in place, removing stubs of .proto files that no longer
    exist; returns the generated files, sorted."""
    out = []
    for package in packages:
        target = generated_root / package
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(Path(tmp), proto_root, package)
            for old in _generated_files(target):
                old.unlink()
            for path in fresh:
                shutil.copyfile(path, target / path.name)
        out += _generated_files(target)
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate the stubs under protos/ in place, or with --check report stale stubs (exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m genserve.protos.codegen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the stubs are stale")
    parser.add_argument(
        "--out", type=Path, default=GENERATED_ROOT, help="generated root (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        if stale:
            print(f"stale generated stubs in {args.out}: {', '.join(stale)}", file=sys.stderr)
            print("run: python -m genserve.protos.codegen", file=sys.stderr)
            return 1
        print(f"generated stubs in {args.out} are current")
        return 0
    for path in regenerate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
