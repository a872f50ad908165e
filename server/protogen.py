"""Generate the Python stubs of the wire contract (``make proto``); the tests call
``generate`` to check that the checked-in stubs are not stale. Needs grpcio-tools (the
``dev`` extra).

    python -m q8kv.server.protogen [PROTO_DIR]

The proto files are package data of ``q8kv.v1``: without PROTO_DIR they are found where that
package is imported from (the checkout's proto/ under an editable install), and the stubs
are written beside them. PROTO_DIR (the Makefile passes proto/) names the root instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PROTO_FILES = ["q8kv/v1/kvcache.proto"]  # import paths, relative to the proto root
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_root() -> Path:
    """The directory that holds q8kv/v1/kvcache.proto where q8kv.v1 is imported from."""
    proto = Path(str(resources.files("q8kv.v1").joinpath("kvcache.proto")))
    if not proto.is_file():
        raise FileNotFoundError(f"q8kv.v1 has no kvcache.proto (looked at {proto})")
    return proto.parents[2]


def generate(out_dir: Path, root: Path | None = None) -> list[Path]:
    """Write the stubs of every proto file under ``root`` (default ``proto_root()``) into
    ``out_dir``; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root() if root is None else root
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(root / p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) > 1:
        print("usage: python -m q8kv.server.protogen [PROTO_DIR]", file=sys.stderr)
        return 2
    root = Path(args[0]) if args else proto_root()
    for path in generate(root, root):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
