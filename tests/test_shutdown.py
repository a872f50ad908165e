"""SIGTERM under load: calls in flight finish with correct results, later calls are refused
with UNAVAILABLE (so are further messages of streams already open), health goes
NOT_SERVING, and the process exits 0."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from harness.geometry import Geo
from harness.logs import wait_for_log
from harness.tensors import qkv

from q8kv.client import Client, Q8KVError

GEOM = Geo(num_layers=1, num_heads=8, num_kv_heads=2, head_dim=64, max_len=100_000)


def test_sigterm_under_load_drains(start_server):
    srv = start_server("--grace-seconds", "5")
    outcomes: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(index: int) -> None:
        rng = np.random.default_rng(index)
        try:
            with Client(srv.address, timeout=10) as c:
                s = c.create_session(**GEOM)
                length = 0
                while not stop.is_set():
                    q, k, _ = qkv(rng, 4, GEOM)
                    try:
                        out = s.append_and_attend(0, q, k, k)
                        length += 4
                        assert out.shape == (4, 8, 64) and np.isfinite(out).all()
                        result = "ok"
                    except Q8KVError as err:
                        result = err.code.name
                    with lock:
                        outcomes.append(result)
                    if result != "ok":
                        return
        except Q8KVError as err:  # the create itself may land after the drain began
            with lock:
                outcomes.append(err.code.name)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and outcomes.count("ok") < 30:
        time.sleep(0.05)
    assert outcomes.count("ok") >= 30, f"no load reached the server: {outcomes[:5]}"
    srv.signal()
    assert srv.proc.wait(30) == 0, srv.logs()
    stop.set()
    for t in threads:
        t.join(30)
    # Every call either completed or was refused as unavailable; none failed otherwise.
    assert set(outcomes) <= {"ok", "UNAVAILABLE"}, set(outcomes)
    logs = srv.logs()
    assert "event=draining" in logs and "event=stopped" in logs
    with grpc.insecure_channel(srv.address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            reachable = True
        except grpc.FutureTimeoutError:
            reachable = False
    assert not reachable


def test_open_stream_messages_after_drain_began_are_refused_unapplied(start_server, tmp_path):
    """A stream opened before SIGTERM: its next messages are answered UNAVAILABLE one by
    one and applied nowhere (the snapshot written at the end holds the length from
    before), and once the client closes it the server exits 0."""
    directory = tmp_path / "snaps"
    srv = start_server("--grace-seconds", "30", "--snapshot-dir", str(directory))
    rng = np.random.default_rng(31)

    with Client(srv.address, timeout=30) as c:
        s = c.create_session(**GEOM)
        stream = c.stream()
        ((_, length),) = stream.attend([(s, 0, *qkv(rng, 3, GEOM))], with_lengths=True)
        assert length == 3
        srv.signal()
        wait_for_log(srv, "event=draining")
        for _ in range(3):
            request_id = stream.send([(s, 0, *qkv(rng, 2, GEOM))])
            with pytest.raises(Q8KVError) as err:
                stream.recv(request_id)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert err.value.request_id == request_id
            assert "shutting down" in err.value.message
        stream.close()
    assert srv.proc.wait(30) == 0, srv.logs()
    assert "event=snapshot_saved sessions=1" in srv.logs()

    again = start_server("--snapshot-dir", str(directory))
    with Client(again.address) as c:
        assert c.session_info(s.id).layer_lengths == [3]
