"""Forks and copy-on-write through the Engine (numpy backend): every branch of a fork tree
computes what a session fed the same tokens from scratch computes, bit for bit, whatever
is appended, truncated, deleted or rolled back around it; the pool's reference counts and
per-tenant charges stay exact (``check_invariants``) and go back to zero; a copy that
cannot get a page fails cleanly, with nothing half-made."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest
from harness.forks import TENANT, Branches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q8kv.server.backends.base import AttendItem
from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import Geometry, PagePool, SessionStore
from q8kv.server.engine import AppendRequest, Engine
from q8kv.server.errors import InvalidArgument, ResourceExhausted

PCB = 4096  # geometry (4, 2, 64): 16 tokens per page
GEO = Geometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=512)


class FlakyBackend(NumpyBackend):
    """Fails a device call on demand, after writing every item (the worst case for a roll
    back: the written pages hold the failed call's tokens)."""

    fail: bool = False

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        if self.fail:
            for item in items:
                self._append(item)
            raise RuntimeError("injected device failure")
        return super().append_and_attend(items)


def exact(mine: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_array_equal(mine, theirs)


def run(
    body, num_pages: int = 256, seed: int = 0, replay_tenant: str = TENANT, **store_kwargs
) -> None:
    """``await body(branches)`` on a fresh engine; invariants checked after it."""
    store = SessionStore(PagePool(num_pages, PCB), max_sessions=64, **store_kwargs)
    engine = Engine(FlakyBackend(num_pages, PCB), store, max_queue_delay_us=100)
    engine.start()
    try:
        branches = Branches(engine, GEO, np.random.default_rng(seed), replay_tenant=replay_tenant)
        asyncio.run(asyncio.wait_for(body(branches), 120))
        store.check_invariants()
    finally:
        engine.stop(timeout=5)


def state(store: SessionStore) -> tuple:
    """Everything a failed call must leave as it was (read it on the engine's worker: a
    failed batch answers its jobs while it is still rolling back the others)."""
    return (
        {
            k: (s.lengths.tolist(), {i: t.tolist() for i, t in s.page_lists.items()})
            for k, s in store._sessions.items()
        },
        store.pool.refs.tolist(),
        sorted(store.pool._free),
        dict(store.tenant_pages),
        store.cached_values,
    )


def test_fork_then_diverge_matches_sessions_built_from_scratch() -> None:
    """Forks, a fork of a fork, a fork at a shorter length, the source appending too,
    branches appending together into one shared page in one batch, a truncate into the
    shared region, the source deleted while its forks live: every output and cache equals
    a from-scratch session's, and the pool is empty once all are deleted."""

    async def body(b: Branches) -> None:
        store = b.engine.store
        await b.create("src")
        await b.append("src", 37)  # 2 full pages + 5 tokens of a third, per layer
        used = store.pool.used_pages
        for name in ("a", "b"):
            await b.fork(name, "src")
        assert store.pool.used_pages == used  # a fork takes no page
        assert store.pool.shared_saved_pages == 2 * used
        await b.engine.call(store.check_invariants)
        await b.append("a", 1)  # copies the shared partial page (one per layer)
        assert store.pool.used_pages == used + GEO.num_layers
        await b.append("a", 1)  # now private: written in place
        assert store.pool.used_pages == used + GEO.num_layers
        await b.append("b", 20)
        await b.append("src", 1)  # the source copies too, while "b" still shares it
        await b.fork("c", "a", length=38)  # a fork of a fork, cut into a's own page
        await b.append("c", 5)
        await b.fork("d", "src")
        await b.append_together(["a", "c", "d", "src"], 1)  # d and src share a page
        await b.truncate("b", 30)  # into the region shared with src, a and c
        await b.append("b", 4)
        await b.delete("src")  # its forks live on
        await b.append("d", 3)
        await b.engine.call(store.check_invariants)
        assert await b.check(exact) > 0
        for name in list(b.history):
            await b.delete(name)
        assert store.pool.used_pages == 0 and store.pool.references == 0
        assert not store.deferred and not +store.tenant_pages

    run(body)


def test_fork_length_checks_and_limits() -> None:
    """length past the shortest layer: INVALID_ARGUMENT naming the field, the bound and
    the value, nothing created; length 0 gives an empty fork; a fork takes a session slot
    and nothing else, so it works with a full pool."""

    async def body(b: Branches) -> None:
        store, engine = b.engine.store, b.engine
        await b.create("src")
        await b.append("src", 20)
        await engine.append_and_attend([AppendRequest("src", 0, *b._step(3).appended[0])], TENANT)
        before = await b.engine.call(lambda: state(store))
        with pytest.raises(InvalidArgument, match=r"length: expected 0\.\.20 .*'src'.*got 21"):
            await engine.fork_session("src", TENANT, "f", 21, 0)
        with pytest.raises(InvalidArgument, match=r"length: expected 0\.\.20 .*got -1"):
            await engine.fork_session("src", TENANT, "f", -1, 0)
        assert await b.engine.call(lambda: state(store)) == before
        empty = await engine.fork_session("src", TENANT, "f0", 0, 0)
        assert empty.layer_lengths == [0, 0] and empty.pages_held == 0
        whole = await engine.fork_session("src", TENANT, "", None, 0)
        assert whole.layer_lengths == [23, 20] and len(whole.id) == 36  # a UUID4
        cut = await engine.fork_session("src", TENANT, "f20", 20, 0)
        assert cut.layer_lengths == [20, 20]

    run(body)


def test_copy_without_a_free_page_fails_cleanly() -> None:
    """The pool is full: a fork still works (no page), but its first append into the
    shared partial page needs a copy and fails RESOURCE_EXHAUSTED with nothing changed;
    appends that start a new page fail alike; once a page is free the copy works."""

    async def body(b: Branches) -> None:
        store = b.engine.store
        await b.create("src")
        await b.append("src", 37)  # 3 pages per layer: 6 of the pool's 6
        assert store.pool.free_pages == 0
        prefix = await b.layers("src")
        await b.fork("f", "src")
        before = await b.engine.call(lambda: state(store))
        for name in ("f", "src"):
            with pytest.raises(ResourceExhausted, match="memory budget"):
                await b.append(name, 1)
            assert await b.engine.call(lambda: state(store)) == before
        await b.engine.call(store.check_invariants)
        await b.fork("g", "src", length=32)  # page-aligned: the next append needs a new page
        await b.delete("g")
        await b.truncate("src", 16)  # frees src's own reference only: still no free page
        assert store.pool.free_pages == 0
        await b.delete("src")  # now f holds every page alone: it writes in place
        await b.append("f", 2)
        for (k, v), (k0, v0) in zip(await b.layers("f"), prefix, strict=True):
            np.testing.assert_array_equal(k[:, :37], k0)
            np.testing.assert_array_equal(v[:, :37], v0)
        assert k.shape[1] == 39

    run(body, num_pages=6)


def test_a_failed_batch_restores_the_sharing() -> None:
    """Two branches copy the same shared page in one batch and the device call fails after
    writing: the roll back puts the shared page back in both tables, untouched, the copies
    back in the pool; then the same appends give the from-scratch outputs."""

    async def body(b: Branches) -> None:
        store = b.engine.store
        await b.create("src")
        await b.append("src", 21)
        await b.fork("a", "src")
        await b.fork("c", "src", length=19)  # c appends into the same shared page, earlier
        before = await b.engine.call(lambda: state(store))
        b.engine.backend.fail = True
        with pytest.raises(Exception, match="injected"):
            await b.append_together(["a", "c", "src"], 2)
        b.engine.backend.fail = False
        assert await b.engine.call(lambda: state(store)) == before
        await b.engine.call(store.check_invariants)
        await b.append_together(["a", "c", "src"], 2)
        assert await b.check(exact) > 0

    run(body)


def test_tenant_charged_once_per_page_and_limits_hold() -> None:
    """A tenant is charged for each page it references once: forks cost nothing, a copy
    costs one page, and --tenant-max-bytes stops copies cleanly."""

    async def body(b: Branches) -> None:
        store = b.engine.store
        await b.create("src")
        await b.append("src", 37)
        assert store.tenant_pages[TENANT] == 6
        for i in range(5):
            await b.fork(f"f{i}", "src")
        assert store.tenant_pages[TENANT] == 6
        await b.append("f0", 1)  # +2 copies: at the limit of 8
        assert store.tenant_pages[TENANT] == 8
        before = await b.engine.call(lambda: state(store))
        with pytest.raises(ResourceExhausted, match="tenant memory"):
            await b.append("f1", 1)
        assert await b.engine.call(lambda: state(store)) == before
        store.tenant_max_pages = 0  # room for the from-scratch replays
        assert await b.check(exact) > 0

    run(body, tenant_max_pages=8)


def test_lru_eviction_counts_only_pages_really_freed() -> None:
    """An idle source's pages are freed only with its idle fork: evicting the source
    alone frees nothing, so both go when that makes room, and none when even both would
    not free enough."""

    async def body(b: Branches) -> None:
        store = b.engine.store
        await b.create("src")
        await b.append("src", 32)  # 2 pages per layer, page-aligned: 4 of 8
        await b.fork("f", "src")
        await b.create("busy")
        for name in ("src", "f"):
            store.get(name, TENANT, touch=False).last_used_mono -= 1000
        with pytest.raises(ResourceExhausted):  # 9 pages for one layer: more than the pool
            item = AppendRequest("busy", 0, *b._step(144).appended[0])
            await b.engine.append_and_attend([item], TENANT)
        assert {s.id for s in store.sessions()} == {"src", "f", "busy"}
        # 6 pages: 4 free + the 4 src and f hold together (src alone frees none).
        await b.append("busy", 48)
        assert {s.id for s in store.sessions()} == {"busy"}
        assert store.pool.used_pages == 6 and store.pool.references == 6

    run(body, num_pages=8, evict_idle_seconds=1)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 9), st.integers(1, 20)),
        st.tuples(st.just("together"), st.integers(0, 9), st.integers(1, 3)),
        st.tuples(st.just("fork"), st.integers(0, 9), st.one_of(st.none(), st.integers(0, 60))),
        st.tuples(st.just("truncate"), st.integers(0, 9), st.integers(0, 60)),
        st.tuples(st.just("delete"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("fail"), st.integers(0, 9), st.integers(1, 3)),
    ),
    min_size=4,
    max_size=14,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, seed=st.integers(0, 2**32 - 1))
def test_random_fork_trees_match_scratch(ops, seed) -> None:
    """Random forks (at random lengths), appends, coalesced appends, truncates, deletes
    and failed batches under a tight page limit: invariants after every step, and at the end every
    live branch equals its from-scratch replay."""

    async def body(b: Branches) -> None:
        store, created = b.engine.store, 0
        await b.create("s0")
        await b.append("s0", 21)
        for kind, pick, arg in ops:
            names = sorted(b.history)
            if not names:
                break
            name = names[pick % len(names)]
            try:
                if kind == "append":
                    await b.append(name, arg)
                elif kind in ("together", "fail"):
                    chosen = names[pick % len(names) :][:arg] or [name]
                    b.engine.backend.fail = kind == "fail"
                    try:
                        await b.append_together(chosen, 1 + pick % 3)
                    finally:
                        b.engine.backend.fail = False
                elif kind == "fork":
                    created += 1
                    shortest = int(store.get(name, TENANT, touch=False).lengths.min())
                    await b.fork(f"f{created}", name, None if arg is None else arg % (shortest + 1))
                elif kind == "truncate":
                    await b.truncate(name, arg)
                else:
                    await b.delete(name)
            except (ResourceExhausted, RuntimeError):
                pass  # a full pool or the injected failure: nothing changed (checked below)
            await b.engine.call(store.check_invariants)
        await b.check(exact)

    # The branches' tenant is held to 20 pages (the tight pool); the from-scratch replay runs
    # as another tenant in the rest of the pool, so a tree that fills its 20 pages still
    # replays (with one pool of 20, the replay itself ran out: RESOURCE_EXHAUSTED).
    run(body, num_pages=80, seed=seed, replay_tenant="scratch", tenant_max_pages=20)
