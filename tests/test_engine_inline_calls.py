"""Metadata calls (truncate, create, delete) on the event loop when the engine is idle, and
the answers of worker-run calls sent only once the engine is idle again (issue 12: the
truncate's thread hop made the next decode step take the worker path).

Order with appends, all-or-nothing and the pool's invariants hold either way."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from harness.engine import engine_held
from harness.engine_run import GEO, Harness, assert_same_state, run

from q8kv.server.errors import InvalidArgument, NotFound, ResourceExhausted


def _record_threads(h: Harness) -> list[str]:
    """Names of the threads that run the store's truncates, in order."""
    names: list[str] = []
    truncate = h.store.truncate

    def recorded(session, length):
        names.append(threading.current_thread().name)
        return truncate(session, length)

    h.store.truncate = recorded  # type: ignore[method-assign]
    return names


def test_truncate_runs_on_the_loop_when_idle_and_the_next_step_too() -> None:
    async def body(h: Harness) -> None:
        await h.engine.create_session(GEO, "s", 0.0, None, "t")
        threads = _record_threads(h)
        executed: list[str] = []
        execute = h.engine.worker._execute

        def counted(job):
            executed.append(threading.current_thread().name)
            return execute(job)

        h.engine.worker._execute = counted
        rng = np.random.default_rng(5)
        for step in range(20):
            n = int(rng.integers(1, 6))
            request = h.request(h.store.get("s", "t"), 0, n)
            await h.engine.append_and_attend([request], tenant="t")
            snap = await h.engine.truncate_session("s", "t", step % 3)
            assert snap.layer_lengths == [step % 3, 0]
        main = threading.current_thread().name
        assert threads == [main] * 20
        assert executed == [main] * 20  # every step inline: none found the engine busy
        h.store.check_invariants()

    run(body)


def test_truncate_queued_behind_a_held_engine_keeps_order_with_appends() -> None:
    """While the worker is busy, a truncate waits its turn: appends queued before it apply
    first, appends queued after it apply after it."""

    async def body(h: Harness) -> None:
        await h.engine.create_session(GEO, "s", 0.0, None, "")
        session = h.store.get("s", "")
        first = h.request(session, 0, 7)
        later = h.request(session, 0, 3)
        threads = _record_threads(h)
        async with engine_held(h.engine):
            a = asyncio.ensure_future(h.engine.append_and_attend([first], tenant=""))
            await asyncio.sleep(0.01)  # queued behind the hold
            cut = asyncio.ensure_future(h.engine.truncate_session("s", "", 2))
            await asyncio.sleep(0.01)
            b = asyncio.ensure_future(h.engine.append_and_attend([later], tenant=""))
            await asyncio.sleep(0.01)
            assert not (a.done() or cut.done() or b.done())
        (out_a, len_a), = await a
        snap = await cut
        (out_b, len_b), = await b
        assert (len_a, snap.layer_lengths[0], len_b) == (7, 2, 5)
        assert threads == ["q8kv-engine"]
        assert h.store.get("s", "").lengths.tolist() == [5, 0]
        await h.check_output(later, out_b, 5)
        h.store.check_invariants()

    run(body)


def test_inline_truncate_errors_change_nothing() -> None:
    async def body(h: Harness) -> None:
        await h.engine.create_session(GEO, "s", 0.0, None, "t")
        request = h.request(h.store.get("s", "t"), 1, 9)
        await h.engine.append_and_attend([request], tenant="t")
        before = await h.snapshot()
        with pytest.raises(InvalidArgument, match=r"length: expected >= 0, got -4"):
            await h.engine.truncate_session("s", "t", -4)
        with pytest.raises(NotFound, match="session_id"):
            await h.engine.truncate_session("s", "other-tenant", 0)
        with pytest.raises(NotFound, match="session_id"):
            await h.engine.truncate_session("missing", "t", 0)
        assert_same_state(before, await h.snapshot())
        assert h.store.get("s", "t").lengths.tolist() == [0, 9]
        assert not h.engine.worker.queue.busy
        h.store.check_invariants()

    run(body)


def test_inline_call_that_fails_leaves_the_engine_idle_and_serving() -> None:
    """A bug in an inline call answers as the worker would (INTERNAL; no memory:
    RESOURCE_EXHAUSTED) and the engine stays usable."""

    async def body(h: Harness) -> None:
        def broken():
            raise RuntimeError("a bug")

        def no_memory():
            raise MemoryError

        with pytest.raises(RuntimeError, match="a bug"):
            await h.engine.call(broken, inline=True)
        assert not h.engine.worker.queue.busy
        with pytest.raises(ResourceExhausted, match="host memory"):
            await h.engine.call(no_memory, inline=True)
        assert not h.engine.worker.queue.busy
        await h.engine.create_session(GEO, "s", 0.0, None, "")
        request = h.request(h.store.get("s", ""), 0, 4)
        ((out, length),) = await h.engine.append_and_attend([request], tenant="")
        assert length == 4
        await h.check_output(request, out, 4)
        assert await h.engine.delete_session("s", "") > 0
        h.store.check_invariants()

    run(body)


def test_a_worker_call_is_answered_only_once_the_engine_is_idle() -> None:
    """The worker wakes the caller's loop only after marking the engine idle: the wake-up
    (a socket write) lets the loop take the GIL at once, and a decode step the answer sets
    off used to find the worker still 'busy' and take two thread hops instead of running
    inline."""

    async def body(h: Harness) -> None:
        loop = asyncio.get_running_loop()
        wake = loop.call_soon_threadsafe
        busy_at_wake: list[bool] = []

        def recorded(callback, *args, **kwargs):
            if threading.current_thread().name == "q8kv-engine":
                busy_at_wake.append(h.engine.worker.queue.busy)
            return wake(callback, *args, **kwargs)

        loop.call_soon_threadsafe = recorded  # type: ignore[method-assign]
        try:
            values = np.random.default_rng(7).integers(0, 1000, 50).tolist()
            for value in values:
                assert await h.engine.call(lambda value=value: value) == value
                assert not h.engine.worker.queue.busy
            with pytest.raises(NotFound):
                await h.engine.call(lambda: h.store.get("missing"))
        finally:
            loop.call_soon_threadsafe = wake  # type: ignore[method-assign]
        assert busy_at_wake == [False] * 51

    run(body)
