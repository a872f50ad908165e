"""The checked-in stubs are what `make proto` would generate from proto/ right now."""

from __future__ import annotations

from pathlib import Path

from q8kv.server import protogen


def test_checked_in_stubs_are_fresh(tmp_path: Path) -> None:
    generated = protogen.generate(tmp_path)
    assert generated, "protoc wrote nothing"
    for path in generated:
        relative = path.relative_to(tmp_path)
        checked_in = protogen.PROTO_ROOT / relative
        assert checked_in.exists(), f"{relative} is missing: run `make proto`"
        assert checked_in.read_text() == path.read_text(), (
            f"{relative} is stale: run `make proto` and commit the result"
        )
