"""Nothing lost in a restart: with --snapshot-dir, SIGTERM writes every session (a set:
one file per session and a manifest written last) and the next start loads them:
Dequantize bit for bit, appends continue with correct attention, tenants kept. A corrupted
and a truncated snapshot are logged, moved to corrupt/ and never loaded; the good ones
still load and stay in place until the next snapshot replaces them."""

from __future__ import annotations

import json
import re
import signal

import grpc
import numpy as np
import pytest
from harness.geometry import GEOM
from harness.sessions import caches, fill
from harness.tensors import qkv
from reference import attention_ref, rel_l2

from q8kv.client import Client, Q8KVError

TOKENS = {"Q8KV_AUTH_TOKENS": "restart-alpha-12345 alpha,restart-bravo-54321 bravo"}
A, B = "restart-alpha-12345", "restart-bravo-54321"


def test_sessions_survive_a_restart(start_server, tmp_path):
    directory = tmp_path / "snapshots"
    srv = start_server("--snapshot-dir", str(directory), env=TOKENS)
    rng = np.random.default_rng(11)
    plan = {  # (token, id) -> layer lengths
        (A, "keep-1"): [5, 40, 0],
        (A, "keep-2"): [1, 1, 1],
        (A, "shared"): [3, 0, 2],
        (A, "to-corrupt"): [9, 9, 9],
        (A, "to-truncate"): [20, 0, 0],
        (B, "shared"): [0, 7, 0],  # the same id in another tenant
        (B, "bravo-1"): [2, 2, 2],
    }
    before = {}
    for (token, sid), lengths in plan.items():
        with Client(srv.address, token=token) as c:
            s = c.create_session(**GEOM, session_id=sid,
                                 softmax_scale=0.11 if sid == "keep-1" else None)
            fill(s, rng, lengths)
            before[(token, sid)] = caches(s, 3), s.info()

    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.logs()
    assert "event=snapshot_saved sessions=7" in srv.logs()
    assert [p.name for p in directory.iterdir()] == ["set-000000000001"]
    live = directory / "set-000000000001"
    names = sorted(["alpha~keep-1.q8kv", "alpha~keep-2.q8kv", "alpha~shared.q8kv",
                    "alpha~to-corrupt.q8kv", "alpha~to-truncate.q8kv",
                    "bravo~shared.q8kv", "bravo~bravo-1.q8kv"])
    assert sorted(p.name for p in live.iterdir()) == sorted([*names, "MANIFEST.json"])
    manifest = json.loads((live / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == names
    corrupted = live / "alpha~to-corrupt.q8kv"
    data = bytearray(corrupted.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    truncated = live / "alpha~to-truncate.q8kv"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 3])

    again = start_server("--snapshot-dir", str(directory), env=TOKENS)
    logs = again.logs()
    skipped = re.findall(r"event=snapshot_skipped file=(\S+) reason=(.*)", logs)
    assert sorted(f for f, _ in skipped) == ["alpha~to-corrupt.q8kv", "alpha~to-truncate.q8kv"]
    reasons = dict(skipped)
    assert "truncated" in reasons["alpha~to-truncate.q8kv"]
    assert re.search("checksum mismatch|unreadable|truncated|expected", reasons[
        "alpha~to-corrupt.q8kv"])
    assert "event=snapshot_loaded sessions=5" in logs
    # Loaded files stay until the next snapshot replaces them; bad ones are set aside for a
    # person to look at.
    assert sorted(p.name for p in directory.iterdir()) == ["corrupt", "set-000000000001"]
    assert sorted(p.name for p in (directory / "corrupt" / live.name).iterdir()) == [
        "alpha~to-corrupt.q8kv", "alpha~to-truncate.q8kv"
    ]
    assert sorted(p.name for p in live.iterdir()) == sorted(
        [n for n in names if "~to-" not in n] + ["MANIFEST.json"]
    )

    for (token, sid), lengths in plan.items():
        with Client(again.address, token=token) as c:
            if sid.startswith("to-"):
                with pytest.raises(Q8KVError) as err:
                    c.session_info(sid)
                assert err.value.code == grpc.StatusCode.NOT_FOUND
                continue
            s = c.session(sid)
            info = s.info()
            old_caches, old_info = before[(token, sid)]
            assert info.layer_lengths == lengths
            assert info.softmax_scale == old_info.softmax_scale
            assert info.ttl_seconds == old_info.ttl_seconds
            assert caches(s, 3) == old_caches, sid
    with Client(again.address, token=A) as a, Client(again.address, token=B) as b:
        assert {i.id for i in a.list_sessions()} == {"keep-1", "keep-2", "shared"}
        assert {i.id for i in b.list_sessions()} == {"shared", "bravo-1"}
        # Appends continue where they were, attending over the restored cache.
        s = a.session("keep-1")
        for layer, n in ((0, 1), (1, 6), (2, 3), (1, 1)):
            start = s.length(layer)
            q, k, v = qkv(rng, n, GEOM)
            out = s.append_and_attend(layer, q, k, v, with_length=True)
            assert out.length == start + n
            keys, values = s.dequantize(layer)
            assert rel_l2(out.output, attention_ref(q, keys, values, start, 0.11)) < 1e-5
        assert s.info().layer_lengths == [6, 47, 3]
        assert caches(b.session("shared"), 3) == before[(B, "shared")][0]
    # The next snapshot replaces the whole set; the set-aside files stay.
    assert again.stop() == 0
    assert sorted(p.name for p in directory.iterdir()) == ["corrupt", "set-000000000002"]
    assert len(list((directory / "corrupt" / live.name).iterdir())) == 2
