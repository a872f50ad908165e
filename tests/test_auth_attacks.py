"""Hostile callers: unauthenticated calls are refused from their metadata before the
server reads their body (memory stays flat), and a revoked token ends its open streams at
the next message."""

from __future__ import annotations

import signal
import threading

import grpc
import numpy as np
import pytest
from harness.geometry import GEOM
from harness.logs import wait_for_log
from harness.proc import reset_peak_rss, status_kib
from harness.rpc import bearer, random_item, stub
from harness.scrape import Samples, scrape
from harness.tensors import qkv

from q8kv.client import Client
from q8kv.v1 import kvcache_pb2 as pb

TOKEN_A = "alpha-attack-token-0123"
TOKEN_B = "bravo-attack-token-4567"
MIB = 1024 * 1024
BIG = 64 * MIB


def big_calls(s, rng, metadata):
    """One call of each RPC kind, each carrying a 64 MiB request message of random data."""
    blob = rng.integers(0, 256, BIG, dtype=np.uint8).tobytes()
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    long_id = letters[rng.integers(0, 26, BIG)].tobytes().decode()
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[BIG // 4], data=blob)
    item = pb.AttendItem(session_id="s", layer=0, q=tensor)
    chunk = pb.SessionChunk(tokens=pb.TokenChunk(layer=0, start=0, count=1, codes=blob))
    return {
        "unary_unary": lambda: s.AppendAndAttend(
            pb.AppendAndAttendRequest(items=[item]),
            metadata=metadata, timeout=60),
        "unary_stream": lambda: list(s.ExportSession(
            pb.ExportSessionRequest(session_id=long_id), metadata=metadata, timeout=60)),
        "stream_unary": lambda: s.ImportSession(iter([chunk]), metadata=metadata, timeout=60),
        "stream_stream": lambda: list(s.AppendAndAttendStream(
            iter([pb.AppendAndAttendStreamRequest(request_id=1, items=[item])]),
            metadata=metadata, timeout=60)),
    }


@pytest.mark.parametrize("metadata", [(), bearer("not-a-known-token-at-all")],
                         ids=["no-token", "unknown-token"])
def test_unauthenticated_64mib_calls_are_refused_before_their_body_is_read(
    start_server, metadata
):
    srv = start_server("--log-level", "WARNING", env={"Q8KV_AUTH_TOKENS": f"{TOKEN_A} alpha"})
    rng = np.random.default_rng(17)
    with grpc.insecure_channel(srv.address) as channel:
        s = stub(channel)
        # Warm every path once with small calls, so the measure sees only the big bodies.
        with pytest.raises(grpc.RpcError):
            s.ListSessions(pb.ListSessionsRequest(), metadata=metadata, timeout=10)
        with Client(srv.address, token=TOKEN_A) as c:
            c.create_session(**GEOM).append_and_attend(0, *qkv(rng, 2, GEOM))
        calls = big_calls(s, rng, metadata)
        codes: dict[str, object] = {}

        def run(kind: str) -> None:
            try:
                calls[kind]()
                codes[kind] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                codes[kind] = (exc.code(), exc.details())

        before = status_kib(srv.proc.pid, "VmRSS")
        reset_peak_rss(srv.proc.pid)
        threads = [threading.Thread(target=run, args=(kind,)) for kind in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        peak = status_kib(srv.proc.pid, "VmHWM")
    assert {k: c[0] for k, c in codes.items()} == {
        k: grpc.StatusCode.UNAUTHENTICATED for k in calls
    }, codes
    assert all(d.startswith("authorization: ") for _, d in codes.values()), codes
    grown = (peak - before) * 1024
    assert grown < BIG, f"server RSS rose by {grown / MIB:.0f} MiB for 4 refused calls"


def stream_message(request_id: int, sid: str, rng) -> pb.AppendAndAttendStreamRequest:
    return pb.AppendAndAttendStreamRequest(
        request_id=request_id, items=[random_item(sid, 0, rng)]
    )


class OpenStream:
    """A bidi AppendAndAttendStream fed one message at a time."""

    def __init__(self, channel, metadata) -> None:
        self._queue: list = []
        self._ready = threading.Condition()
        self._closed = False
        self.call = stub(channel).AppendAndAttendStream(self._requests(), metadata=metadata,
                                                        timeout=60)

    def _requests(self):
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                message = self._queue.pop(0)
            yield message

    def send(self, message) -> None:
        with self._ready:
            self._queue.append(message)
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()


@pytest.mark.parametrize("how", ["removed", "moved-to-another-tenant"])
def test_revoked_token_ends_its_open_stream_at_the_next_message(start_server, tmp_path, how):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_A} alpha\n")
    srv = start_server("--auth-tokens-file", str(path))
    rng = np.random.default_rng(23)
    with Client(srv.address, token=TOKEN_A) as a:
        session = a.create_session(**GEOM)
    with grpc.insecure_channel(srv.address) as channel:
        stream = OpenStream(channel, bearer(TOKEN_A))
        replies = iter(stream.call)
        stream.send(stream_message(1, session.id, rng))
        assert next(replies).results[0].length == 1

        # A reload that keeps the token: the stream goes on.
        path.write_text(f"{TOKEN_A} alpha\n{TOKEN_B} bravo\n")
        srv.signal(signal.SIGHUP)
        wait_for_log(srv, "event=auth_reloaded")
        stream.send(stream_message(2, session.id, rng))
        assert next(replies).results[0].length == 2

        kept = f"{TOKEN_B} bravo\n"
        path.write_text(kept if how == "removed" else kept + f"{TOKEN_A} bravo\n")
        srv.signal(signal.SIGHUP)
        wait_for_log(srv, "event=auth_reloaded", count=2)
        stream.send(stream_message(3, session.id, rng))
        with pytest.raises(grpc.RpcError) as err:
            next(replies)
        stream.close()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details().startswith("authorization: ")
    assert "event=auth_revoked_stream tenant=alpha" in srv.logs()
    # The refused message was not applied (read back with a token now valid for alpha).
    path.write_text(f"{TOKEN_B} alpha\n")
    srv.signal(signal.SIGHUP)
    wait_for_log(srv, "event=auth_reloaded", count=3)
    with Client(srv.address, token=TOKEN_B) as again:
        assert again.session_info(session.id).layer_lengths == [2, 0, 0]


def test_a_refusal_is_counted_under_the_methods_own_type(start_server):
    """The refusal runs request-streaming on the wire; the metrics still say unary."""
    srv = start_server(env={"Q8KV_AUTH_TOKENS": f"{TOKEN_A} alpha"})
    with grpc.insecure_channel(srv.address) as channel:
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                stub(channel).ListSessions(pb.ListSessionsRequest(), timeout=10)
    samples = Samples(scrape(srv.metrics_url))
    refused = samples.find("grpc_server_handled_total", grpc_method="ListSessions")
    assert len(refused) == 1, refused
    assert refused[0].labels["grpc_type"] == "unary"
    assert refused[0].labels["grpc_code"] == "UNAUTHENTICATED"
    assert refused[0].value == 3
