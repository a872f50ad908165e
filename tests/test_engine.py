"""The engine (server/engine.py): batching, all-or-nothing appends, rollback, ordering.

Each test runs a real Engine (worker thread) over a NumpyBackend inside ``asyncio.run``,
once with no queue delay (an idle engine may run a job inline on the event loop) and once
with a queue delay (every job goes through the worker's batcher). To force requests to
coalesce into one batch, the engine is held busy by an ``engine.call`` that waits on a
threading.Event while the requests are queued, then released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest
from harness.engine import TIMEOUT, engine_held
from harness.engine_run import GEO, PCB, Harness, assert_same_state, run
from reference import dequantize_ref, quantize_ref

from q8kv.server.backends.base import AttendItem
from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import Geometry, PagePool, Session, SessionStore
from q8kv.server.engine import AppendRequest, Engine
from q8kv.server.engine.jobs import AppendJob
from q8kv.server.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)


class FailingBackend(NumpyBackend):
    """Writes the first item's k/v into its pages, then fails like a lost device."""

    fail = True

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        if self.fail:
            self._append(items[0])
            raise RuntimeError("device lost")
        return super().append_and_attend(items)


@pytest.fixture(params=[0, 200], ids=["no-delay", "queue-delay"])
def queue_delay_us(request: pytest.FixtureRequest) -> int:
    """max_queue_delay_us of the engine under test."""
    return request.param


# -- the happy path ----------------------------------------------------------------------


def test_append_returns_outputs_and_lengths(queue_delay_us: int) -> None:
    """Each item returns (float32 output, new length); outputs match the reference, and the
    cache holds exactly the quantized k/v appended."""

    async def body(h: Harness) -> None:
        s = await h.create()
        ks = []
        for layer, n in [(0, 7), (1, 1), (0, 33), (0, 1), (1, 20)]:
            req = h.request(s, layer, n)
            [(out, length)] = await h.append(req)
            assert length == s.layers[layer].length
            await h.check_output(req, out, length)
            if layer == 0:
                ks.append(req.k)
        assert [layer.length for layer in s.layers] == [41, 21]
        state, _, _ = await h.snapshot()
        want_k = dequantize_ref(*quantize_ref(np.concatenate(ks))).transpose(1, 0, 2)
        np.testing.assert_array_equal(state[s.id][0][2], want_k.astype(np.float32))

    run(body, seed=1, max_queue_delay_us=queue_delay_us)


def test_same_layer_twice_in_one_request(queue_delay_us: int) -> None:
    """Items of one request on the same (session, layer) apply in order: the second sees
    the first's tokens, the first does not see the second's."""

    async def body(h: Harness) -> None:
        s = await h.create()
        await h.append(h.request(s, 0, 10))
        reqs = [h.request(s, 0, 3), h.request(s, 1, 4), h.request(s, 0, 20), h.request(s, 0, 1)]
        results = await h.append(*reqs)
        assert [length for _, length in results] == [13, 4, 33, 34]
        for req, (out, length) in zip(reqs, results, strict=True):
            await h.check_output(req, out, length)
        assert h.batches[-1] == 4

    run(body, seed=2, max_queue_delay_us=queue_delay_us)


def test_truncate_then_append(queue_delay_us: int) -> None:
    """After a truncate run on the worker, appends continue from the cut and attend over
    the kept prefix (unchanged) plus the new tokens."""

    async def body(h: Harness) -> None:
        s = await h.create()
        await h.append(h.request(s, 0, 40), h.request(s, 1, 9))
        (state, _, _) = await h.snapshot()
        await h.engine.call(lambda: h.store.truncate(s, 21))
        assert [layer.length for layer in s.layers] == [21, 9]
        assert len(s.layers[0].pages) == 2
        req = h.request(s, 0, 5)
        [(out, length)] = await h.append(req)
        assert length == 26
        await h.check_output(req, out, length)
        (after, _, _) = await h.snapshot()
        np.testing.assert_array_equal(after[s.id][0][2][:, :21], state[s.id][0][2][:, :21])
        np.testing.assert_array_equal(after[s.id][1][2], state[s.id][1][2])

    run(body, seed=3, max_queue_delay_us=queue_delay_us)


# -- failures change nothing -------------------------------------------------------------


def _bad_shape(h: Harness, s: Session, other: Session) -> AppendRequest:
    req = h.request(other, 0, 2)
    req.k = req.k[:, :1]
    return req


def _bad_q_dims(h: Harness, s: Session, other: Session) -> AppendRequest:
    req = h.request(other, 0, 2)
    req.q = req.q[0]
    return req


def _no_tokens(h: Harness, s: Session, other: Session) -> AppendRequest:
    return h.request(other, 0, 0)


def _unknown_session(h: Harness, s: Session, other: Session) -> AppendRequest:
    req = h.request(other, 0, 2)
    req.session_id = "no-such-session"
    return req


def _bad_layer(h: Harness, s: Session, other: Session) -> AppendRequest:
    req = h.request(other, 0, 2)
    req.layer = 2
    return req


def _past_max_len(h: Harness, s: Session, other: Session) -> AppendRequest:
    return h.request(other, 1, GEO.max_len)  # other's layer 1 already holds tokens


def _pool_exhausted(h: Harness, s: Session, other: Session) -> AppendRequest:
    return h.request(other, 1, 150)  # 10 more pages; the pool has fewer left


FAILURES = {
    "bad_shape": (_bad_shape, InvalidArgument, "items[2].k.shape: expected [n, 2, 64]"),
    "q_not_3d": (_bad_q_dims, InvalidArgument, "items[2].q.shape: expected 3 dimensions"),
    "no_tokens": (_no_tokens, InvalidArgument, "items[2].q.shape[0]: expected >= 1"),
    "unknown_session": (_unknown_session, NotFound, "no session 'no-such-session'"),
    "layer_out_of_range": (_bad_layer, InvalidArgument, "layer: expected 0..1"),
    "past_max_len": (_past_max_len, OutOfRange, "past max_len 200"),
    "pool_exhausted": (_pool_exhausted, ResourceExhausted, "memory budget"),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_failed_request_changes_nothing(kind: str, queue_delay_us: int) -> None:
    """A request whose third item fails (its first two are valid and take new pages, one of
    them twice on the same layer) changes no length, page, cached value or free count, and
    the engine keeps serving."""
    make_bad, error, message = FAILURES[kind]

    async def body(h: Harness) -> None:
        s = await h.create()
        other = await h.create()
        await h.append(h.request(s, 0, 16), h.request(other, 1, 5), h.request(other, 0, 3))
        before = await h.snapshot()
        assert before[1] < 10  # the pool cannot take 150 more tokens
        requests = [h.request(s, 0, 5), h.request(s, 0, 17), make_bad(h, s, other)]
        with pytest.raises(error) as info:
            await h.append(*requests)
        assert message in info.value.message
        assert_same_state(before, await h.snapshot())
        req = h.request(other, 1, 2)  # still serving
        [(out, length)] = await h.append(req)
        assert length == 7
        await h.check_output(req, out, length)

    run(body, seed=10, num_pages=8, max_queue_delay_us=queue_delay_us)


def test_other_tenant_fails_like_unknown_session(queue_delay_us: int) -> None:
    """An item naming another tenant's session is NOT_FOUND and changes nothing."""

    async def body(h: Harness) -> None:
        mine = await h.create(tenant="alice")
        await h.append(h.request(mine, 0, 4), tenant="alice")
        before = await h.snapshot()
        with pytest.raises(NotFound, match=f"no session '{mine.id}'"):
            await h.append(h.request(mine, 0, 4), tenant="bob")
        assert_same_state(before, await h.snapshot())

    run(body, seed=11, max_queue_delay_us=queue_delay_us)


def test_failing_request_in_a_batch_fails_alone(queue_delay_us: int) -> None:
    """Requests coalesced into one batch: the failing ones get their own error and change
    nothing; the others succeed with correct outputs, in one backend call."""

    async def body(h: Harness) -> None:
        a = await h.create()
        b = await h.create()
        await h.append(h.request(a, 0, 10), h.request(b, 1, 190))
        good1 = [h.request(a, 0, 7)]
        unknown = [h.request(a, 1, 3), h.request(b, 0, 2)]
        unknown[1].session_id = "gone"
        good2 = [h.request(b, 0, 1), h.request(a, 0, 2)]
        too_long = [h.request(a, 1, 5), h.request(b, 1, 11)]  # b.1 at 190 + 11 > 200
        good3 = [h.request(b, 1, 10)]
        jobs = [good1, unknown, good2, too_long, good3]
        results = await h.coalesced(*[lambda items=items: h.append(*items) for items in jobs])
        assert isinstance(results[1], NotFound) and isinstance(results[3], OutOfRange)
        assert h.batches == [2, 1 + 2 + 1]  # the setup call, then one coalesced call
        for items, result in zip(jobs[0::2], results[0::2], strict=True):
            for req, (out, length) in zip(items, result, strict=True):
                await h.check_output(req, out, length)
        assert [layer.length for layer in a.layers] == [19, 0]
        assert [layer.length for layer in b.layers] == [1, 200]
        assert [length for _, length in results[2]] == [1, 19]

    run(body, seed=12, max_queue_delay_us=queue_delay_us)


def test_backend_exception_rolls_back_the_whole_batch(queue_delay_us: int) -> None:
    """If the device call fails, every request of the batch gets the error and every
    session is as before (lengths, pages, cached values, free pages); the same requests
    then succeed."""

    async def body(h: Harness) -> None:
        a = await h.create()
        b = await h.create()
        h.engine.backend.fail = False
        await h.append(h.request(a, 0, 14), h.request(b, 0, 16))
        h.engine.backend.fail = True
        before = await h.snapshot()
        jobs = [
            [h.request(a, 0, 5)],
            [h.request(b, 0, 1), h.request(b, 1, 3)],
            [h.request(a, 0, 20), h.request(a, 1, 1)],
        ]
        results = await h.coalesced(*[lambda items=items: h.append(*items) for items in jobs])
        assert all(isinstance(r, RuntimeError) and str(r) == "device lost" for r in results)
        assert_same_state(before, await h.snapshot())
        h.engine.backend.fail = False
        results = await h.coalesced(*[lambda items=items: h.append(*items) for items in jobs])
        for items, result in zip(jobs, results, strict=True):
            for req, (out, length) in zip(items, result, strict=True):
                await h.check_output(req, out, length)
        assert [layer.length for layer in a.layers] == [39, 1]

    run(body, seed=13, backend_cls=FailingBackend, max_queue_delay_us=queue_delay_us)


def test_unexpected_error_in_a_request_fails_it_alone(queue_delay_us: int) -> None:
    """An item that breaks validation in an unexpected way (not a ServiceError) fails its
    request, leaves the cache as before, and does not stop the worker."""

    async def body(h: Harness) -> None:
        s = await h.create()
        await h.append(h.request(s, 0, 3))
        before = await h.snapshot()
        broken = h.request(s, 1, 2)
        broken.k = None  # type: ignore[assignment]
        with pytest.raises(AttributeError):
            await h.append(h.request(s, 0, 30), broken)
        assert_same_state(before, await h.snapshot())
        req = h.request(s, 0, 1)
        [(out, length)] = await h.append(req)
        assert length == 4
        await h.check_output(req, out, length)

    run(body, seed=14, max_queue_delay_us=queue_delay_us)


# -- deadlines ---------------------------------------------------------------------------


def test_expired_deadline_appends_nothing(queue_delay_us: int) -> None:
    """A request whose deadline passed before the worker reached it is DEADLINE_EXCEEDED
    and appends nothing; a request in the same batch without a deadline runs."""

    async def body(h: Harness) -> None:
        s = await h.create()
        await h.append(h.request(s, 0, 5))
        before = await h.snapshot()
        with pytest.raises(DeadlineExceeded, match="deadline"):
            await h.append(h.request(s, 0, 20), deadline=time.monotonic() - 1)
        assert_same_state(before, await h.snapshot())
        late = h.request(s, 0, 3)
        fine = h.request(s, 1, 2)
        soon = time.monotonic() + 0.005  # expires while the worker is held
        results = await h.coalesced(lambda: h.append(late, deadline=soon), lambda: h.append(fine))
        assert isinstance(results[0], DeadlineExceeded)
        [(out, length)] = results[1]
        await h.check_output(fine, out, length)
        assert [layer.length for layer in s.layers] == [5, 2]

    run(body, seed=15, max_queue_delay_us=queue_delay_us)


# -- ordering and batching ---------------------------------------------------------------


def test_per_session_order_is_arrival_order(queue_delay_us: int) -> None:
    """Concurrent single-token appends on one session land in the order they were made
    (lengths 1..N, the cache holds their k in that order), held or not."""

    async def body(h: Harness) -> None:
        s = await h.create(Geometry(1, 4, 2, 64, 500))
        other = await h.create()
        reqs = [h.request(s, 0, 1) for _ in range(40)]
        noise = [h.request(other, 0, 1) for _ in range(10)]
        free_run = await asyncio.gather(*[h.append(r) for r in reqs[:20]])
        jobs = [lambda r=r: h.append(r) for r in reqs[20:]]
        jobs[3:3] = [lambda r=r: h.append(r) for r in noise]
        held = await h.coalesced(*jobs)
        own = [res for i, res in enumerate(held) if not 3 <= i < 13]
        assert [res[0][1] for res in free_run + own] == list(range(1, 41))
        assert [held[i][0][1] for i in range(3, 13)] == list(range(1, 11))
        assert h.batches[-1] == 30  # the held ones ran as one batch
        state, _, _ = await h.snapshot()
        want = dequantize_ref(*quantize_ref(np.concatenate([r.k for r in reqs])))
        np.testing.assert_array_equal(state[s.id][0][2], want.transpose(1, 0, 2).astype(np.float32))
        for req, res in zip(reqs[-3:], own[-3:], strict=True):
            await h.check_output(req, *res[0])

    run(body, seed=16, max_queue_delay_us=queue_delay_us)


def test_batches_respect_max_batch_items(queue_delay_us: int) -> None:
    """Queued requests coalesce up to max_batch_items items per backend call."""

    async def body(h: Harness) -> None:
        sessions = [await h.create() for _ in range(3)]
        jobs = [lambda s=s: h.append(h.request(s, 0, 1)) for s in sessions * 2]
        jobs.append(lambda: h.append(*[h.request(s, 1, 2) for s in sessions]))
        results = await h.coalesced(*jobs)
        assert not any(isinstance(r, BaseException) for r in results)
        assert h.batches == [4, 2, 3]
        assert [s.layers[0].length for s in sessions] == [2, 2, 2]

    run(body, seed=17, max_batch_items=4, max_queue_delay_us=queue_delay_us)


def test_stopped_engine_rejects_new_work() -> None:
    """After stop(), new work is UNAVAILABLE."""
    store = SessionStore(PagePool(4, PCB), max_sessions=2)
    engine = Engine(NumpyBackend(4, PCB), store)
    engine.start()
    engine.stop(timeout=5)

    async def body() -> None:
        with pytest.raises(Unavailable, match="shutting down"):
            await engine.call(lambda: None)

    asyncio.run(body())


# -- conditional appends (expected_length) -----------------------------------------------


def test_expected_length_mismatch_aborts_the_whole_call(queue_delay_us: int) -> None:
    """An item whose expected_length is not its layer's length (counting the call's earlier
    items) is ABORTED naming the item, the layer's length and the expected one; nothing of
    the call is appended. Matching expectations append as usual."""

    async def body(h: Harness) -> None:
        s = await h.create()
        await h.append(h.request(s, 0, 9))
        before = await h.snapshot()
        first, second, stale = h.request(s, 0, 4), h.request(s, 0, 2), h.request(s, 1, 3)
        first.expected_length, second.expected_length = 9, 13  # 13: after the first item
        stale.expected_length = 1  # layer 1 is empty
        with pytest.raises(Aborted) as info:
            await h.append(first, second, stale)
        assert info.value.message == (
            "items[2].expected_length: expected the layer's length 0, got 1"
        )
        assert info.value.code.name == "ABORTED"
        assert_same_state(before, await h.snapshot())
        stale.expected_length = 0
        results = await h.append(first, second, stale)
        assert [length for _, length in results] == [13, 15, 3]
        for req, (out, length) in zip((first, second, stale), results, strict=True):
            await h.check_output(req, out, length)

    run(body, seed=20, max_queue_delay_us=queue_delay_us)


# -- callers that go away ----------------------------------------------------------------


def test_cancelled_call_is_not_applied(queue_delay_us: int) -> None:
    """A call cancelled (client gone, deadline, drain) while its job waits in the queue is
    never applied: no length, page or cached value changes, and the calls queued with it
    run normally."""

    async def body(h: Harness) -> None:
        s = await h.create()
        await h.append(h.request(s, 0, 5))
        before = await h.snapshot()
        gone, kept = h.request(s, 0, 20), h.request(s, 1, 2)
        async with engine_held(h.engine, TIMEOUT):
            cancelled = asyncio.ensure_future(h.append(gone))
            other = asyncio.ensure_future(h.append(kept))
            await asyncio.sleep(0.02)  # both queued behind the hold
            cancelled.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        [(out, length)] = await other
        assert length == 2
        await h.check_output(kept, out, length)
        after = await h.snapshot()
        assert after[0][s.id][0][:2] == before[0][s.id][0][:2]  # layer 0 untouched
        assert [layer.length for layer in s.layers] == [5, 2]
        assert h.batches == [1, 1]  # the setup call, then only the kept one

    run(body, seed=21, max_queue_delay_us=queue_delay_us)


def test_cancellation_race_applies_or_skips_whole_jobs(queue_delay_us: int) -> None:
    """Many one-token appends to one layer, each cancelled at a random moment: every job
    is either claimed by the engine, applied and answered (its future holds the result), or
    withdrawn and never applied; the layer's length is exactly the applied count."""

    async def body(h: Harness) -> None:
        s = await h.create(Geometry(1, 4, 2, 64, 500))
        jobs: list[AppendJob] = []
        submit = h.engine.worker.append

        async def recording(job: AppendJob):
            jobs.append(job)
            return await submit(job)

        h.engine.worker.append = recording
        applied: list[int] = []
        h.engine.observer.on_append = applied.append  # one call per applied job
        tasks = []
        for _ in range(120):
            # A call alone in flight may run inline on this loop, the others on the worker.
            tasks.append(asyncio.ensure_future(h.append(h.request(s, 0, 1))))
            if h.rng.random() < 0.5:
                await asyncio.sleep(h.rng.uniform(0, 0.002))
            tasks[-1 - int(h.rng.integers(min(8, len(tasks))))].cancel()  # a recent one
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await h.engine.call(lambda: None)  # the worker has finished every claimed job
        await asyncio.sleep(0.01)  # answers set from the worker have landed on this loop
        answered = 0
        for job in jobs:
            if job.claimed:
                assert not job.withdrawn and job.future.done() and not job.future.cancelled()
                [(_, length)] = job.future.result()
                answered += 1
            else:
                assert job.withdrawn and job.future.cancelled()
        assert answered == len(applied) == s.layers[0].length
        lengths = sorted(r[0][1] for r in results if not isinstance(r, BaseException))
        assert lengths == sorted(set(lengths)) and set(lengths) <= set(range(1, answered + 1))
        assert 0 < answered < len(tasks)
        h.store.check_invariants()

    run(body, seed=22, backend_cls=SlowBackend, max_queue_delay_us=queue_delay_us)


class SlowBackend(NumpyBackend):
    """Takes a few milliseconds per device call, so jobs wait in the queue."""

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        time.sleep(0.003)
        return super().append_and_attend(items)


# -- host memory -------------------------------------------------------------------------


class OutOfMemoryBackend(NumpyBackend):
    """Writes the first item, then runs out of host memory (as numpy does on a huge
    allocation)."""

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        self._append(items[0])
        raise MemoryError("Unable to allocate 18.0 GiB for an array")


def test_memory_error_is_resource_exhausted_and_rolls_back(queue_delay_us: int) -> None:
    """A MemoryError in the device call answers RESOURCE_EXHAUSTED (never INTERNAL) to
    every call of the batch, and every one of them is rolled back."""

    async def body(h: Harness) -> None:
        s = await h.create()
        before = await h.snapshot()
        results = await h.coalesced(
            lambda: h.append(h.request(s, 0, 30)), lambda: h.append(h.request(s, 1, 3))
        )
        for result in results:
            assert isinstance(result, ResourceExhausted), result
            assert "host memory" in result.message and "send fewer tokens" in result.message
        assert_same_state(before, await h.snapshot())
        h.store.check_invariants()

    run(body, seed=23, backend_cls=OutOfMemoryBackend, max_queue_delay_us=queue_delay_us)
