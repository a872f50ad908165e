"""The checked-in stubs are what `make proto` would generate from proto/ right now."""

from __future__ import annotations

import shutil
from pathlib import Path

import q8kv.v1.kvcache_pb2
from q8kv.server import protogen


def test_checked_in_stubs_are_fresh(tmp_path: Path) -> None:
    generated = protogen.generate(tmp_path)
    assert generated, "protoc wrote nothing"
    for path in generated:
        relative = path.relative_to(tmp_path)
        checked_in = protogen.proto_root() / relative
        assert checked_in.exists(), f"{relative} is missing: run `make proto`"
        assert checked_in.read_text() == path.read_text(), (
            f"{relative} is stale: run `make proto` and commit the result"
        )


def test_the_proto_is_found_as_package_data_of_q8kv_v1() -> None:
    """Where q8kv.v1 is imported from, not a guess at a checkout around the server."""
    stubs_dir = Path(q8kv.v1.kvcache_pb2.__file__).resolve().parent
    assert (protogen.proto_root() / "q8kv" / "v1").resolve() == stubs_dir
    assert (stubs_dir / "kvcache.proto").is_file()


def test_make_proto_writes_the_stubs_beside_the_given_proto_dir(tmp_path: Path) -> None:
    for relative in protogen.PROTO_FILES:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(protogen.proto_root() / relative, tmp_path / relative)
    assert protogen.main([str(tmp_path)]) == 0
    stubs = sorted(p.name for p in (tmp_path / "q8kv" / "v1").glob("*_pb2*"))
    assert stubs == ["kvcache_pb2.py", "kvcache_pb2.pyi", "kvcache_pb2_grpc.py"]
    assert protogen.main(["a", "b"]) == 2
