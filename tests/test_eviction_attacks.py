"""Eviction during a call, and whose sessions go.

- Reserving pages for a later item of a batch never evicts a session an earlier item (of
  this or another call in the batch) already prepared: the earlier caller would get OK for
  a session that no longer exists, attending over another tenant's token.
- A rollback after an eviction gives back exactly the pages the call took, never an
  evicted session's pages a second time (double free).
- LRU eviction takes the appending tenant's own idle sessions before other tenants'.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest
from harness.engine import engine_held
from harness.geometry import Geo
from harness.rpc import attend_item, bearer, stub
from harness.tensors import qkv, random_tensor
from reference import attention_ref, rel_l2

from q8kv import wire
from q8kv.server import cache as cache_module
from q8kv.server.backends.base import page_bytes
from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import Geometry, PagePool, Session, SessionStore
from q8kv.server.engine import AppendRequest, Engine
from q8kv.server.errors import InvalidArgument, NotFound, ResourceExhausted
from q8kv.v1 import kvcache_pb2 as pb

PCB = 4096  # geometry (4, 2, 64): 16 tokens per page
GEO = Geometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=400)
TIMEOUT = 20.0


def request(rng, session: Session, layer: int, n: int) -> AppendRequest:
    return AppendRequest(
        session.id, layer, *qkv(rng, n, session.geometry, tensor=random_tensor)
    )


def start_engine(num_pages: int, **store_kwargs) -> Engine:
    store = SessionStore(PagePool(num_pages, PCB), max_sessions=16, **store_kwargs)
    # A queue delay sends every call through the worker's batcher (none runs inline).
    engine = Engine(NumpyBackend(num_pages, PCB), store, max_queue_delay_us=200)
    engine.start()
    return engine


async def coalesced(engine: Engine, *calls) -> list:
    """Queue every call while the worker is held busy, then release it: one batch, in
    order. Returns results, exceptions included."""
    async with engine_held(engine, TIMEOUT):
        tasks = []
        for call in calls:
            tasks.append(asyncio.ensure_future(call()))
            await asyncio.sleep(0.01)  # queued in this order
    return await asyncio.gather(*tasks, return_exceptions=True)


def layer_state(engine: Engine, session: Session, layer: int):
    view = session.layers[layer]
    k, v = engine.backend.dequantize(session.layout, view.page_table(), 0, view.length)
    return view.length, view.pages, k, v


# -- a later item of a batch evicts nothing an earlier one prepared --------------------


def test_later_item_cannot_evict_a_session_an_earlier_call_prepared() -> None:
    """Tenant alice's session has a near-zero TTL (set directly: the store now raises a
    client's ttl to MIN_TTL_SECONDS) and the pool is full. Alice's call (no new page
    needed) and bob's call (needs a page) run in one batch. Bob's reservation may evict
    only unpinned sessions: alice's session survives, her output is attention over her own
    cache, and bob gets RESOURCE_EXHAUSTED. (Before the fix: alice's session was evicted,
    its first page handed to bob, and alice got OK over bob's token.)"""
    engine = start_engine(num_pages=4)
    rng = np.random.default_rng(101)

    async def body() -> None:
        store = engine.store
        bob = await engine.call(lambda: store.create(GEO, session_id="b", tenant="bob"))
        await engine.append_and_attend([request(rng, bob, 0, 16)], tenant="bob")
        alice = await engine.call(lambda: store.create(GEO, session_id="a", tenant="alice"))
        await engine.append_and_attend([request(rng, alice, 0, 47)], tenant="alice")
        assert store.pool.free_pages == 0
        alice.ttl_seconds = 1e-6  # expires between any two steps of the batch
        bob_before = await engine.call(lambda: layer_state(engine, bob, 0))
        mine = request(rng, alice, 0, 1)
        results = await coalesced(
            engine,
            lambda: engine.append_and_attend([mine], tenant="alice"),
            lambda: engine.append_and_attend([request(rng, bob, 0, 1)], tenant="bob"),
        )
        assert store.get("a", "alice", touch=False) is alice  # NOT_FOUND before the fix
        [(out, length)] = results[0]
        assert length == 48 and alice.layers[0].length == 48
        k, v = await engine.call(lambda: layer_state(engine, alice, 0)[2:])
        want = attention_ref(mine.q, k, v, 47, alice.softmax_scale)
        assert rel_l2(out, want) < 1e-5
        assert isinstance(results[1], ResourceExhausted)
        after = await engine.call(lambda: layer_state(engine, bob, 0))
        assert after[:2] == bob_before[:2]
        np.testing.assert_array_equal(after[2], bob_before[2])
        await engine.call(store.check_invariants)

    try:
        asyncio.run(asyncio.wait_for(body(), TIMEOUT))
    finally:
        engine.stop(timeout=5)


# -- a rollback after an eviction frees each page once ---------------------------------


def test_rollback_after_an_eviction_frees_no_page_twice() -> None:
    """One call [A+1 (takes the last free page), B+1 (needs a page), B layer 99]: B's
    reservation may evict the idle session C, never A (pinned by this call, though its TTL
    is near zero); the bad layer answers INVALID_ARGUMENT and the rollback returns exactly
    the pages this call took. (Before the fix A was evicted and its new page given back a
    second time: the pool under-counted and two sessions shared a page.)"""
    engine = start_engine(num_pages=4, evict_idle_seconds=5)
    rng = np.random.default_rng(102)

    async def body() -> None:
        store = engine.store
        a, b, c = [await engine.call(lambda i=i: store.create(GEO, session_id=i)) for i in "abc"]
        await engine.append_and_attend([request(rng, a, 0, 16), request(rng, b, 0, 16)])
        await engine.append_and_attend([request(rng, c, 0, 3)])
        c.last_used_mono -= 60  # idle: an LRU victim
        assert store.pool.free_pages == 1
        a.ttl_seconds = 1e-6
        before = await engine.call(lambda: [layer_state(engine, s, 0) for s in (a, b)])
        bad = request(rng, b, 0, 1)
        bad.layer = 99
        with pytest.raises(InvalidArgument, match=r"layer: expected 0\.\.1 .*got 99"):
            await engine.append_and_attend(
                [request(rng, a, 0, 1), request(rng, b, 0, 1), bad]
            )
        assert store.get("a", touch=False) is a  # NOT_FOUND before the fix
        after = await engine.call(lambda: [layer_state(engine, s, 0) for s in (a, b)])
        for (len0, pages0, k0, v0), (len1, pages1, k1, v1) in zip(before, after, strict=True):
            assert (len1, pages1) == (len0, pages0)
            np.testing.assert_array_equal(k1, k0)
            np.testing.assert_array_equal(v1, v0)
        with pytest.raises(NotFound):
            store.get("c")  # C was fair game: idle and not part of the call
        assert store.pool.used_pages == 2 and store.pool.free_pages == 2
        await engine.call(store.check_invariants)

    try:
        asyncio.run(asyncio.wait_for(body(), TIMEOUT))
    finally:
        engine.stop(timeout=5)


# -- LRU takes the appending tenant's own idle sessions first ---------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(cache_module.session.time, "monotonic", fake)
    return fake


def fill(store: SessionStore, session: Session, length: int) -> None:
    with store.begin() as allocation:
        allocation.grow(session, 0, length)


def test_lru_evicts_the_appending_tenants_own_idle_sessions_first(clock: FakeClock) -> None:
    """Bob's idle session is older than alice's, but alice is the one appending: her own
    idle session goes first. Only when hers cannot cover the append are other tenants'
    idle sessions (idle >= evict_idle_seconds) taken, least recently used first."""
    store = SessionStore(PagePool(6, PCB), max_sessions=16, evict_idle_seconds=10)
    evicted: list[str] = []
    store.listeners.append(lambda session, reason: evicted.append(f"{session.tenant}/{session.id}"))
    bob_old = store.create(GEO, session_id="old", tenant="bob")
    bob_new = store.create(GEO, session_id="new", tenant="bob")
    alice_idle = store.create(GEO, session_id="idle", tenant="alice")
    alice_busy = store.create(GEO, session_id="busy", tenant="alice")
    for session, ago in ((bob_old, 100), (bob_new, 50), (alice_idle, 20), (alice_busy, 0)):
        session.touch()
        fill(store, session, 16 if session is not bob_new else 32)
        session.last_used_mono = clock.now - ago
    assert store.pool.free_pages == 1
    fill(store, alice_busy, 16 + 32)  # 2 more pages: alice's own idle session is enough
    assert evicted == ["alice/idle"]
    fill(store, alice_busy, 16 + 32 + 32)  # 2 more: then bob's, oldest first
    assert evicted == ["alice/idle", "bob/old", "bob/new"]
    assert store.tenant_pages == Counter(alice=5, bob=0)
    store.check_invariants()


def test_lru_takes_no_session_of_another_tenant_that_is_not_idle(clock: FakeClock) -> None:
    """Other tenants' sessions are taken only under the evict-idle rule: bob's recently
    used session survives alice's pressure, and alice's append fails changing nothing."""
    store = SessionStore(PagePool(3, PCB), max_sessions=16, evict_idle_seconds=10)
    bob = store.create(GEO, session_id="b", tenant="bob")
    alice = store.create(GEO, session_id="a", tenant="alice")
    fill(store, bob, 32)
    fill(store, alice, 16)
    bob.last_used_mono = clock.now - 5  # idle, but under 10 s
    with pytest.raises(ResourceExhausted, match="memory budget"):
        fill(store, alice, 32)
    assert store.get("b", "bob") is bob and bob.layers[0].length == 32
    assert alice.layers[0].length == 16
    store.check_invariants()


# -- the same end to end: two tenants through a real server ------------------------------

TOKEN_ALICE = "alice-token-0123456789"
TOKEN_BOB = "bob-token-9876543210"
E2E_GEOM = Geo(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, max_len=1024)


def e2e_item(sid: str, rng, n: int) -> tuple[pb.AttendItem, np.ndarray]:
    q, k, v = qkv(rng, n, E2E_GEOM, tensor=random_tensor)
    return attend_item(sid, 0, q, k, v), q


def test_batch_of_two_tenants_keeps_the_prepared_session(start_server, tmp_path) -> None:
    """Through a real server (auth, batching with a queue delay, LRU eviction of anything
    idle for a microsecond, a full pool): alice's decode step and bob's page-needing append
    land in one batch. Alice's session stays, her answer is attention over her own cache,
    bob's call is RESOURCE_EXHAUSTED. (Before the fix, bob's reservation evicted alice's
    session after her item was prepared: alice got OK for a session that was gone.)"""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_ALICE} alice\n{TOKEN_BOB} bob\n")
    srv = start_server(
        "--auth-tokens-file", str(tokens), "--page-bytes", str(PCB),
        "--memory-budget", str(8 * page_bytes(PCB)), "--evict-idle-seconds", "0.000001",
        "--max-queue-delay-us", "500000", "--metrics-port", "-1",
    )
    rng = np.random.default_rng(103)
    alice, bob = bearer(TOKEN_ALICE), bearer(TOKEN_BOB)
    with srv.channel() as channel:
        s = stub(channel)

        def attend(meta, *items):
            return s.AppendAndAttend(pb.AppendAndAttendRequest(items=list(items)),
                                     metadata=meta, timeout=30)

        for sid, meta, n in (("b", bob, 16), ("a", alice, 16 * 7 - 1)):
            s.CreateSession(pb.CreateSessionRequest(session_id=sid, geometry=E2E_GEOM.pb()),
                            metadata=meta, timeout=10)
            attend(meta, e2e_item(sid, rng, n)[0])  # the pool is now full
        mine, q = e2e_item("a", rng, 1)
        answers: dict[str, object] = {}

        def call(name, meta, item):
            try:
                answers[name] = attend(meta, item)
            except grpc.RpcError as err:
                answers[name] = err

        first = threading.Thread(target=call, args=("alice", alice, mine))
        first.start()
        time.sleep(0.1)  # alice's call is first in the batch the worker is filling
        second = threading.Thread(target=call, args=("bob", bob, e2e_item("b", rng, 1)[0]))
        second.start()
        first.join(30)
        second.join(30)
        assert isinstance(answers["bob"], grpc.RpcError)
        assert answers["bob"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = s.GetSession(pb.GetSessionRequest(session_id="a"), metadata=alice, timeout=10)
        assert list(info.session.layer_lengths) == [16 * 7]  # NOT_FOUND before the fix
        (result,) = answers["alice"].results
        assert result.length == 16 * 7
        cache = s.Dequantize(pb.DequantizeRequest(session_id="a", layer=0), metadata=alice,
                             timeout=10)
        keys, values = wire.decode(cache.k), wire.decode(cache.v)
        want = attention_ref(q, keys, values, 16 * 7 - 1, 1 / np.sqrt(64))
        assert rel_l2(wire.decode(result.output), want) < 1e-5
