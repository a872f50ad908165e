"""The page pool's bookkeeping stays exact under anything a caller can do (evictions and
rollbacks in the middle of a batch included): ``SessionStore.check_invariants`` after every
step of random batches driven through the Engine (invalid items, near-zero TTLs, LRU
eviction of anything idle, a full pool, failing device calls, callers that go away), and
the ``Allocation`` contract."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from harness.engine import engine_held
from harness.tensors import random_tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q8kv.server.backends.base import AttendItem
from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import Geometry, PagePool, Session, SessionStore
from q8kv.server.engine import AppendRequest, Engine

PCB = 4096  # geometry (4, 2, 64): 16 tokens per page
GEO = Geometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=80)
TIMEOUT = 20.0
TENANTS = ("alice", "bob")


class FlakyBackend(NumpyBackend):
    """Fails a device call on demand, after writing the first item (a lost device, or the
    host out of memory mid-call)."""

    fail_with: type[BaseException] | None = None

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        if self.fail_with is not None:
            self._append(items[0])
            raise self.fail_with("injected")
        return super().append_and_attend(items)


# -- the Allocation contract -------------------------------------------------------------


def make_store(num_pages: int = 8, **kwargs) -> SessionStore:
    return SessionStore(PagePool(num_pages, PCB), max_sessions=8, **kwargs)


def test_allocation_ends_exactly_once() -> None:
    """Commit or roll back, once: a second end, or a grow after the end, is a bug
    (AssertionError) and changes nothing."""
    store = make_store()
    s = store.create(GEO)
    for first, second in (("commit", "roll_back"), ("roll_back", "roll_back"),
                          ("commit", "commit"), ("roll_back", "commit")):
        allocation = store.begin()
        allocation.grow(s, 0, s.layers[0].length + 17)
        getattr(allocation, first)()
        state = (s.layers[0].length, s.layers[0].pages, store.pool.free_pages)
        with pytest.raises(AssertionError, match=f"{second} after it was"):
            getattr(allocation, second)()
        with pytest.raises(AssertionError, match="grow after it was"):
            allocation.grow(s, 1, 1)
        assert (s.layers[0].length, s.layers[0].pages, store.pool.free_pages) == state
        assert s.pins == 0
        store.check_invariants()


def test_roll_back_undoes_every_step_and_unpins() -> None:
    """Grows on two sessions (one layer twice) roll back to the exact lengths, page tables
    and counters of before; while open, the sessions are pinned."""
    store = make_store(num_pages=16)
    a, b = store.create(GEO, tenant="alice"), store.create(GEO, tenant="bob")
    with store.begin() as setup:
        setup.grow(a, 0, 20)
    before = [(v.length, v.pages) for s in (a, b) for v in s.layers]
    free, values, pages = store.pool.free_pages, store.cached_values, Counter(store.tenant_pages)
    allocation = store.begin()
    allocation.grow(a, 0, 33)
    allocation.grow(b, 1, 5)
    allocation.grow(a, 0, 60)
    assert (a.pins, b.pins) == (1, 1)
    store.check_invariants(at_rest=False)
    allocation.roll_back()
    assert [(v.length, v.pages) for s in (a, b) for v in s.layers] == before
    assert (store.pool.free_pages, store.cached_values) == (free, values)
    assert store.tenant_pages == pages  # Counter: a missing tenant counts as 0
    assert (a.pins, b.pins) == (0, 0)
    store.check_invariants()


def test_extend_in_place_moves_only_the_length_or_leaves_it_to_grow() -> None:
    """The packed call's fast step: inside a layer's private pages it moves the length
    (rolled back like ``grow``); it leaves a session to ``grow``, unchanged, where that must
    act (a new page, a shared partly filled page, past max_len, no token); it refuses a
    session the allocation has not pinned."""
    store = make_store(num_pages=16)
    store.copy_page = lambda src, dst: None
    a, b, c, source = (store.create(GEO) for _ in range(4))
    tpp = a.layout.tokens_per_page
    with store.begin() as setup:
        setup.grow(a, 0, tpp + 1)  # two pages, the second partly filled
        setup.grow(b, 0, 2 * tpp)  # two full pages: the next token needs a third
        setup.grow(c, 0, GEO.max_len - 1)  # one token below max_len, in a partial page
        setup.grow(source, 0, tpp + 1)
    fork = store.fork(source, "f")  # shares the source's partly filled second page
    sessions = [a, b, c, fork]

    def state():
        return ([(s.layers[0].length, s.layers[0].pages) for s in sessions],
                store.pool.free_pages, store.cached_values)  # fmt: skip

    allocation = store.begin()
    with pytest.raises(AssertionError, match="unpinned session"):
        allocation.extend_in_place(sessions, 0, 1)
    for s in sessions:
        allocation.pin(s)
    before = state()
    assert allocation.extend_in_place(sessions, 0, 0) == [0, 1, 2, 3]  # no token
    # b needs a page, c would pass max_len, the fork would write into a shared page.
    assert allocation.extend_in_place(sessions, 0, 2) == [1, 2, 3]
    assert state()[0][1:] == before[0][1:] and state()[1] == before[1]
    assert a.layers[0].length == tpp + 3 and a.layers[0].pages == before[0][0][1]
    assert allocation.extend_in_place([c], 0, 1) == []  # exactly max_len
    store.check_invariants(at_rest=False)
    allocation.roll_back()
    assert state() == before
    allocation = store.begin()
    allocation.pin(fork)
    assert allocation.extend_in_place([fork], 0, 1) == [0]
    allocation.grow(fork, 0, tpp + 2)  # grow copies the shared page
    assert fork.layers[0].pages[1] != source.layers[0].pages[1]
    allocation.commit()
    store.check_invariants()


def test_pinned_sessions_are_never_evicted() -> None:
    """A pinned session survives its TTL and LRU eviction; unpinned, it goes."""
    store = make_store(num_pages=2, evict_idle_seconds=1e-9)
    s = store.create(GEO)
    with store.begin() as setup:
        setup.grow(s, 0, 32)
    s.ttl_seconds = 1e-9
    s.last_used_mono -= 100
    allocation = store.begin()
    allocation.pin(s)
    assert store.evict_expired() == 0
    other = store.create(GEO)
    with pytest.raises(Exception, match="memory budget"), store.begin() as grow:
        grow.grow(other, 0, 1)
    assert store.get(s.id, touch=False) is s
    allocation.commit()
    assert store.evict_expired() == 1 and len(store) == 1
    store.check_invariants()


def test_check_invariants_catches_corruption() -> None:
    """A page freed twice, a page shared by two layers, or a drifted counter is caught."""
    for corrupt in ("double_free", "shared", "counter", "tenant"):
        store = make_store()
        a, b = store.create(GEO), store.create(GEO)
        with store.begin() as setup:
            setup.grow(a, 0, 20)
            setup.grow(b, 0, 3)
        store.check_invariants()
        if corrupt == "double_free":
            store.pool.give_back([a.page_lists[0][0]])
        elif corrupt == "shared":
            b.page_lists[0][0] = a.page_lists[0][0]
        elif corrupt == "counter":
            store.cached_values -= 1
        else:
            store.tenant_pages[""] -= 1
        with pytest.raises(AssertionError):
            store.check_invariants()


# -- random batches through the engine -------------------------------------------------------


@dataclass
class Item:
    target: int  # index into the tenant's live sessions (modulo)
    layer: int
    n: int
    fault: str  # "none", or how the item is broken / conditioned (see Driver.request)


@dataclass
class Job:
    tenant: str
    items: list[Item]
    cancel: bool  # the caller goes away before the worker reaches it


# Mostly valid items (so batches land and fill the pool), with every kind of bad one mixed
# in: unknown session, layer out of range, wrong expected_length, misshaped k.
FAULTS = ["none"] * 12 + ["unknown", "layer", "shape", "expect_right", "expect_wrong"]
ITEMS = st.builds(
    Item,
    target=st.integers(0, 5),
    layer=st.integers(0, 1),
    n=st.integers(1, 40),
    fault=st.sampled_from(FAULTS),
)
JOBS = st.builds(
    Job,
    tenant=st.sampled_from(TENANTS),
    items=st.lists(ITEMS, min_size=1, max_size=3),
    cancel=st.sampled_from([False] * 5 + [True]),
)
BATCH = st.tuples(
    st.just("batch"),
    st.lists(JOBS, min_size=1, max_size=5),
    st.sampled_from([None] * 6 + [RuntimeError, MemoryError]),
)
STEPS = st.one_of(
    BATCH,
    BATCH,
    BATCH,
    st.tuples(st.just("create"), st.sampled_from(TENANTS), st.sampled_from([0, 1e-6])),
    st.tuples(st.just("delete"), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 7), st.integers(0, 40)),
    # Forks share pages; appends into a shared partial page copy it (inside the batch).
    st.tuples(st.just("fork"), st.integers(0, 7), st.one_of(st.none(), st.integers(0, 40))),
    st.tuples(st.just("fork"), st.integers(0, 7), st.none()),
    st.tuples(st.just("idle"), st.integers(0, 7)),
    st.tuples(st.just("expire"), st.integers(0, 7)),
)


class Driver:
    def __init__(self, engine: Engine, rng: np.random.Generator) -> None:
        self.engine = engine
        self.store = engine.store
        self.rng = rng
        self.created = 0  # ids in creation order: a failing example replays exactly

    def live(self) -> list[Session]:
        return sorted(self.store, key=lambda s: (s.tenant, s.id))

    def request(self, item: Item, sessions: list[Session], tenant: str) -> AppendRequest:
        mine = [s for s in sessions if s.tenant == tenant]
        session = mine[item.target % len(mine)] if mine else None
        sid = "no-such-session" if session is None or item.fault == "unknown" else session.id
        kvh = GEO.num_kv_heads - (item.fault == "shape")
        req = AppendRequest(
            sid,
            GEO.num_layers if item.fault == "layer" else item.layer,
            random_tensor(self.rng, (item.n, GEO.num_heads, GEO.head_dim), np.float32),
            random_tensor(self.rng, (item.n, kvh, GEO.head_dim), np.float32),
            random_tensor(self.rng, (item.n, GEO.num_kv_heads, GEO.head_dim), np.float32),
        )
        if item.fault.startswith("expect") and session is not None:
            # Right only if no earlier item of the batch grows the layer first.
            length = session.layers[item.layer].length
            req.expected_length = length + (item.fault == "expect_wrong")
        return req

    async def step(self, step: tuple) -> None:
        kind, *args = step
        if kind == "batch":
            await self.batch(*args)
        else:
            await self.engine.call(lambda: self.simple(kind, *args))
        await self.engine.call(self.store.check_invariants)

    def simple(self, kind: str, *args) -> None:
        sessions = self.live()
        if kind == "create":
            tenant, ttl = args
            if len(self.store) < self.store.max_sessions:
                self.created += 1
                session = self.store.create(GEO, f"s{self.created}", tenant=tenant)
                if ttl:
                    session.ttl_seconds = ttl  # past the store's floor: expires at once
            return
        if not sessions:
            return
        session = sessions[args[0] % len(sessions)]
        if kind == "fork":
            if len(self.store) < self.store.max_sessions:
                self.created += 1
                length = args[1]
                if length is not None:
                    length = min(length, int(session.lengths.min()))
                self.store.fork(session, f"s{self.created}", length)
        elif kind == "delete":
            self.store.delete(session.id, session.tenant)
        elif kind == "truncate":
            self.store.truncate(session, args[1])
        elif kind == "idle":
            session.last_used_mono -= 1000  # long idle: fair game for LRU
        else:
            session.ttl_seconds = 1e-6  # past the store's floor: expires right after any use

    async def batch(self, jobs: list[Job], failure) -> None:
        sessions = await self.engine.call(self.live)
        before = await self.engine.call(lambda: {
            (s.tenant, s.id): (s, s.lengths.copy()) for s in sessions
        })
        requests = [[self.request(i, sessions, job.tenant) for i in job.items] for job in jobs]
        self.engine.backend.fail_with = failure
        async with engine_held(self.engine, TIMEOUT):
            tasks = []
            for job, reqs in zip(jobs, requests, strict=True):
                tasks.append(asyncio.ensure_future(
                    self.engine.append_and_attend(reqs, tenant=job.tenant)
                ))
                await asyncio.sleep(0)
            await asyncio.sleep(0.005)
            for job, task in zip(jobs, tasks, strict=True):
                if job.cancel:
                    task.cancel()
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        self.engine.backend.fail_with = None
        await self.engine.call(lambda: self.check_outcome(jobs, requests, results, before))

    def check_outcome(self, jobs, requests, results, before) -> None:
        """Every session a successful call named still exists and grew by exactly the
        tokens of successful calls; failed and cancelled calls changed nothing."""
        grown: dict[tuple[str, str], np.ndarray] = {}
        for job, reqs, result in zip(jobs, requests, results, strict=True):
            if job.cancel:
                assert isinstance(result, asyncio.CancelledError), result
                continue
            if isinstance(result, BaseException):
                assert not isinstance(result, AssertionError), result
                continue
            for req, (out, length) in zip(reqs, result, strict=True):
                key = (job.tenant, req.session_id)
                session = self.store.get(req.session_id, job.tenant, touch=False)
                assert session is before[key][0], "a session a call succeeded on was evicted"
                added = grown.setdefault(key, np.zeros(GEO.num_layers, dtype=np.int64))
                added[req.layer] += req.q.shape[0]
                assert length == before[key][1][req.layer] + added[req.layer]
                assert out.shape == req.q.shape and np.isfinite(out).all()
        for key, (session, lengths) in before.items():
            if self.store._sessions.get(key) is not session:
                assert key not in grown  # only sessions no successful call named vanish
                continue
            want = lengths + grown.get(key, 0)
            np.testing.assert_array_equal(session.lengths, want)


@settings(
    max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    steps=st.lists(STEPS, min_size=3, max_size=12),
    evict_idle=st.sampled_from([0.0, 1e-9]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_batches_keep_the_pool_exact(steps, evict_idle, seed) -> None:
    """Random creates, forks (sharing pages; appends copy a shared partial page),
    deletes, truncates and coalesced batches of valid and invalid calls, on an 8-page
    pool that fills up, with sessions whose TTL is near zero and LRU eviction of anything
    idle: the invariants hold after every step, and no successful
    call loses its session."""
    store = SessionStore(
        PagePool(8, PCB), max_sessions=6, evict_idle_seconds=evict_idle, default_ttl=0
    )
    engine = Engine(FlakyBackend(8, PCB), store, max_queue_delay_us=100)
    engine.start()
    driver = Driver(engine, np.random.default_rng(seed))

    async def body() -> None:
        for tenant in TENANTS * 2:
            await driver.step(("create", tenant, 0))
        for step in steps:
            await driver.step(step)

    try:
        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        engine.stop(timeout=5)
