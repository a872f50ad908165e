"""Session reads and TTLs, through a real gRPC server on loopback (started in this process,
so the test can hold the engine's worker busy):

- GetSession and ListSessions are answered from a snapshot of the store, without queueing
  behind the engine's worker; ListSessions pages hold at most 100 sessions.
- A client's ttl_seconds is bounded by the server's (SessionInfo reports the effective
  one); GetSession counts as use, ListSessions does not; softmax_scale is bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest
from harness.engine import hold_engine
from harness.geometry import Geo

from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import MIN_TTL_SECONDS, PagePool, SessionStore
from q8kv.server.engine import Engine
from q8kv.server.rpc.drain import Drain
from q8kv.server.rpc.front import Front
from q8kv.server.rpc.servicer import LIST_PAGE_SIZE, KVCacheService
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

PCB = 4096
GEOMETRY = Geo(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, max_len=256).pb()
SERVER_TTL = 600.0
TIMEOUT = 20.0


class LoopbackServer:
    """KVCacheService over a real Engine, served by grpc.aio on 127.0.0.1 from its own
    event-loop thread."""

    def __init__(self) -> None:
        store = SessionStore(PagePool(64, PCB), max_sessions=512, default_ttl=SERVER_TTL)
        self.engine = Engine(NumpyBackend(64, PCB), store)
        self.engine.start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self._run(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = kvcache_pb2_grpc.KVCacheServiceStub(self.channel)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        service = KVCacheService(self.engine)
        Front(Drain()).register(
            self.server,
            lambda server: kvcache_pb2_grpc.add_KVCacheServiceServicer_to_server(service, server),
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def hold_engine(self) -> threading.Event:
        """Keep the engine's worker busy until the returned event is set."""
        return hold_engine(self.engine, TIMEOUT)

    def create(self, sid: str, **kwargs) -> pb.SessionInfo:
        request = pb.CreateSessionRequest(session_id=sid, geometry=GEOMETRY, **kwargs)
        return self.stub.CreateSession(request, timeout=TIMEOUT).session

    def close(self) -> None:
        self.channel.close()
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.engine.stop(timeout=5)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    s = LoopbackServer()
    yield s
    s.close()


def list_all(stub, page_size: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        reply = stub.ListSessions(
            pb.ListSessionsRequest(page_size=page_size, page_token=token), timeout=TIMEOUT
        )
        pages.append([s.session_id for s in reply.sessions])
        token = reply.next_page_token
        if not token:
            return pages


def test_reads_do_not_wait_for_the_engine(server: LoopbackServer) -> None:
    """With the engine's worker held busy, GetSession and ListSessions still answer, with
    the sessions as they are (before the fix they queued behind the worker)."""
    server.create("a")
    server.create("b")
    gate = server.hold_engine()
    try:
        info = server.stub.GetSession(pb.GetSessionRequest(session_id="b"), timeout=10).session
        listed = server.stub.ListSessions(pb.ListSessionsRequest(), timeout=10).sessions
    finally:
        gate.set()
    assert info.session_id == "b" and list(info.layer_lengths) == [0, 0, 0, 0]
    assert [s.session_id for s in listed] == ["a", "b"]
    with pytest.raises(grpc.RpcError) as err:
        server.stub.GetSession(pb.GetSessionRequest(session_id="zzz"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_sessions_pages_are_bounded(server: LoopbackServer) -> None:
    """page_size 0 and page_size above 100 both give pages of at most 100; following the
    tokens lists every session exactly once, in id order; a negative size is refused."""
    ids = sorted(f"s{i:03d}" for i in range(LIST_PAGE_SIZE + 31))
    for sid in ids:
        server.create(sid)
    for size, want in ((0, LIST_PAGE_SIZE), (10_000, LIST_PAGE_SIZE), (40, 40)):
        pages = list_all(server.stub, size)
        assert [len(p) for p in pages] == [want] * (len(ids) // want) + [len(ids) % want]
        assert [sid for page in pages for sid in page] == ids
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ListSessions(pb.ListSessionsRequest(page_size=-1), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "page_size: expected >= 0, got -1"


@pytest.mark.parametrize(
    "asked,effective",
    [(0, SERVER_TTL), (1e300, SERVER_TTL), (SERVER_TTL * 2, SERVER_TTL), (30, 30),
     (1e-6, MIN_TTL_SECONDS)],
)
def test_session_info_reports_the_effective_ttl(server: LoopbackServer, asked, effective):
    """The server's --session-ttl bounds a client's ttl from above, MIN_TTL_SECONDS from
    below; 0 asks for the server's; CreateSession and GetSession report the ttl in force."""
    created = server.create("t", ttl_seconds=asked)
    got = server.stub.GetSession(pb.GetSessionRequest(session_id="t"), timeout=TIMEOUT)
    assert created.ttl_seconds == got.session.ttl_seconds == effective


def test_get_session_is_a_use_list_sessions_is_not(server: LoopbackServer) -> None:
    """GetSession restarts the idle clock (last_used_at moves); ListSessions leaves it."""
    first = server.create("u").last_used_at
    listed = server.stub.ListSessions(pb.ListSessionsRequest(), timeout=TIMEOUT).sessions
    assert listed[0].last_used_at == first
    server.stub.GetSession(pb.GetSessionRequest(session_id="u"), timeout=TIMEOUT)
    listed = server.stub.ListSessions(pb.ListSessionsRequest(), timeout=TIMEOUT).sessions
    assert listed[0].last_used_at > first


def test_softmax_scale_is_bounded(server: LoopbackServer) -> None:
    """softmax_scale above 1e3: INVALID_ARGUMENT naming the field, bound and value."""
    with pytest.raises(grpc.RpcError) as err:
        server.create("big", softmax_scale=4096.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (
        "softmax_scale: expected a finite value > 0 and <= 1000, got 4096.0"
    )
    assert server.stub.ListSessions(pb.ListSessionsRequest(), timeout=TIMEOUT).sessions == []
