"""Snapshots are never lost on start: a start reads the live set and deletes nothing; a
save commits a whole new set (manifest last) before removing the old one; SIGTERM while
loading exits cleanly with every file kept; SIGHUP while loading only reloads tokens; a
session that does not fit is kept and carried into the next set; a start that fails after
binding (metrics port taken) leaves the set as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import grpc
import numpy as np
import pytest
from harness.geometry import GEOM, page_bytes
from harness.logs import wait_for_log
from harness.server import free_port, listening_socket, run_server
from harness.sessions import caches, fill

from q8kv.client import Client, Q8KVError

A, B = "snap-alpha-token-1234", "snap-bravo-token-5678"
TOKENS = {"Q8KV_AUTH_TOKENS": f"{A} alpha,{B} bravo"}


def set_dirs(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("set-"))


def listing(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (to prove nothing changed)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


def make_snapshot(start_server, directory, plan, seed=0):
    """Start a server, create ``plan`` ({(token, id): layer lengths}), SIGTERM it; returns
    each session's caches and the directory's first set."""
    srv = start_server("--snapshot-dir", str(directory), env=TOKENS)
    rng = np.random.default_rng(seed)
    before = {}
    for (token, sid), lengths in plan.items():
        with Client(srv.address, token=token) as c:
            s = c.create_session(**GEOM, session_id=sid)
            fill(s, rng, lengths)
            before[(token, sid)] = caches(s, GEOM.num_layers)
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.logs()
    assert set_dirs(directory) == ["set-000000000001"]
    return before


def assert_sessions(server, expected) -> None:
    for (token, sid), want in expected.items():
        with Client(server.address, token=token) as c:
            assert caches(c.session(sid), GEOM.num_layers) == want, sid


PLAN = {(A, "one"): [5, 3, 0], (A, "two"): [1, 0, 7], (B, "one"): [2, 2, 2]}


def test_a_save_cut_short_is_ignored_and_the_previous_set_loads(start_server, tmp_path):
    directory = tmp_path / "snaps"
    before = make_snapshot(start_server, directory, PLAN, seed=1)
    live = directory / "set-000000000001"
    # What kill -9 in the middle of a save leaves: a newer set with some files, a temporary
    # one, and no manifest.
    cut = directory / "set-000000000002"
    cut.mkdir()
    (cut / "alpha~one.q8kv").write_bytes((live / "alpha~one.q8kv").read_bytes()[:100])
    (cut / ".alpha~two.q8kv.tmp").write_bytes(b"partial")

    srv = start_server("--snapshot-dir", str(directory), env=TOKENS)
    logs = srv.logs()
    assert "event=snapshot_set_incomplete set=set-000000000002" in logs
    assert "event=snapshot_loaded sessions=3 set=set-000000000001" in logs
    assert_sessions(srv, before)
    with Client(srv.address, token=A) as a:
        a.delete_session("two")
    del before[(A, "two")]

    assert srv.stop() == 0
    # The new set replaced both the old one and the one cut short; no temporary file left.
    assert set_dirs(directory) == ["set-000000000003"]
    new = directory / "set-000000000003"
    assert sorted(p.name for p in new.iterdir()) == [
        "MANIFEST.json", "alpha~one.q8kv", "bravo~one.q8kv"
    ]
    assert not list(directory.rglob("*.tmp"))
    again = start_server("--snapshot-dir", str(directory), env=TOKENS)
    assert_sessions(again, before)
    with Client(again.address, token=A) as a:
        assert [i.id for i in a.list_sessions()] == ["one"]


def feed_fifo(path, data: bytes, timeout: float = 30.0) -> None:
    """Write ``data`` into the named pipe once the server opened it for reading."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO: no reader yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def block_the_first_file(live):
    """Make the set's first file (in load order) a named pipe: loading waits inside that
    file until the test feeds it, a point 'during loading' that is not a race."""
    first = sorted(p for p in live.iterdir() if p.suffix == ".q8kv")[0]
    data = first.read_bytes()
    first.unlink()
    os.mkfifo(first)
    return first, data


def test_sigterm_while_loading_exits_cleanly_and_keeps_every_file(start_server, tmp_path):
    directory = tmp_path / "snaps"
    before = make_snapshot(start_server, directory, PLAN, seed=2)
    live = directory / "set-000000000001"
    fifo, data = block_the_first_file(live)
    kept = {name: body for name, body in listing(directory).items() if name != str(
        fifo.relative_to(directory))}

    srv = start_server("--snapshot-dir", str(directory), env=TOKENS, wait=False)
    wait_for_log(srv, "event=snapshot_loading", timeout=60)
    srv.signal(signal.SIGTERM)
    wait_for_log(srv, "event=stop_requested signal=SIGTERM")
    feed_fifo(fifo, data)
    assert srv.proc.wait(30) == 0, srv.logs()
    logs = srv.logs()
    assert "event=snapshot_load_interrupted" in logs
    assert "event=snapshot_saved" not in logs and "event=listening" not in logs
    assert "Traceback" not in logs
    # Every file is still there, unchanged.
    fifo.unlink()
    fifo.write_bytes(data)
    assert listing(directory) == {**kept, str(fifo.relative_to(directory)): data}
    again = start_server("--snapshot-dir", str(directory), env=TOKENS)
    assert "event=snapshot_loaded sessions=3" in again.logs()
    assert_sessions(again, before)


def test_sighup_while_loading_reloads_tokens_and_the_load_goes_on(start_server, tmp_path):
    directory = tmp_path / "snaps"
    before = make_snapshot(start_server, directory, PLAN, seed=3)
    fifo, data = block_the_first_file(directory / "set-000000000001")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{A} alpha\n")
    srv = start_server("--snapshot-dir", str(directory), "--auth-tokens-file", str(tokens),
                       wait=False)
    wait_for_log(srv, "event=snapshot_loading", timeout=60)
    tokens.write_text(f"{A} alpha\n{B} bravo\n")
    srv.signal(signal.SIGHUP)
    wait_for_log(srv, "event=auth_reloaded")
    feed_fifo(fifo, data)
    srv.wait_serving()
    assert "event=snapshot_loaded sessions=3" in srv.logs()
    assert_sessions(srv, before)  # bravo's token came with the reload


def test_sessions_that_do_not_fit_a_smaller_budget_are_kept(start_server, tmp_path):
    directory = tmp_path / "snaps"
    # 600 tokens of one layer: 3 pages of 64 KiB codes each; four sessions need 12 pages.
    plan = {(A, f"big-{i}"): [600, 0, 0] for i in range(4)}
    before = make_snapshot(start_server, directory, plan, seed=4)
    page = page_bytes(64 * 1024)  # codes and their scales
    small = start_server("--snapshot-dir", str(directory), "--memory-budget", str(7 * page),
                         env=TOKENS)
    logs = small.logs()
    assert logs.count("event=snapshot_not_loaded") == 2, logs
    assert "event=snapshot_loaded sessions=2" in logs
    assert "snapshot_skipped" not in logs and not (directory / "corrupt").exists()
    with Client(small.address, token=A) as a:
        loaded = sorted(i.id for i in a.list_sessions())
        assert len(loaded) == 2
        # Changes on this server land in the next set, next to the sessions it kept.
        a.delete_session(loaded[0])
    del before[(A, loaded[0])]
    small.signal(signal.SIGTERM)
    assert small.proc.wait(30) == 0
    assert set_dirs(directory) == ["set-000000000002"]
    assert "event=snapshot_saved sessions=1 carried=2" in small.logs()

    roomy = start_server("--snapshot-dir", str(directory), env=TOKENS)
    assert "event=snapshot_loaded sessions=3" in roomy.logs()
    assert_sessions(roomy, before)
    with Client(roomy.address, token=A) as a:
        with pytest.raises(Q8KVError) as err:
            a.session_info(loaded[0])
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_a_start_that_fails_after_binding_keeps_the_snapshot(start_server, tmp_path):
    directory = tmp_path / "snaps"
    before = make_snapshot(start_server, directory, PLAN, seed=5)
    untouched = listing(directory)
    with listening_socket() as taken:
        result = run_server(
            "--port", str(free_port()), "--backend", "numpy", "--memory-budget", "64MiB",
            "--snapshot-dir", str(directory), "--metrics-port", str(taken.getsockname()[1]),
            env=TOKENS,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("q8kv-server: error: --metrics-port")
    assert listing(directory) == untouched
    again = start_server("--snapshot-dir", str(directory), env=TOKENS)
    assert_sessions(again, before)


def test_a_failed_save_keeps_the_previous_set(start_server, tmp_path):
    directory = tmp_path / "snaps"
    before = make_snapshot(start_server, directory, PLAN, seed=6)
    srv = start_server("--snapshot-dir", str(directory), env=TOKENS)
    with Client(srv.address, token=A) as a:
        a.delete_session("one")
    # The next set's name is taken by a file: the save cannot write its set.
    (directory / "set-000000000002").write_text("in the way")
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert "event=snapshot_save_failed" in srv.logs()
    assert set_dirs(directory) == ["set-000000000001", "set-000000000002"]
    manifest = json.loads((directory / "set-000000000001" / "MANIFEST.json").read_text())
    assert len(manifest["files"]) == 3
    (directory / "set-000000000002").unlink()
    again = start_server("--snapshot-dir", str(directory), env=TOKENS)
    assert_sessions(again, before)  # the deleted session is back: the last set is the truth


def test_files_of_the_layout_before_sets_load_and_move_into_a_set(start_server, tmp_path):
    directory = tmp_path / "snaps"
    before = make_snapshot(start_server, directory, PLAN, seed=7)
    live = directory / "set-000000000001"
    for path in live.glob("*.q8kv"):  # what the previous version left: loose files
        path.rename(directory / path.name)
    shutil.rmtree(live)
    srv = start_server("--snapshot-dir", str(directory), env=TOKENS)
    assert "event=snapshot_loaded sessions=3 set=loose" in srv.logs()
    assert_sessions(srv, before)
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert sorted(p.name for p in directory.iterdir()) == ["set-000000000001"]
    again = start_server("--snapshot-dir", str(directory), env=TOKENS)
    assert_sessions(again, before)
