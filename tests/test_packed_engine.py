"""A packed job (Engine.attend_batch) through the engine: its q/k/v reach the backend as one
PackedItems; coalesced with item jobs it keeps the queue's order; a failure anywhere rolls
every job of the batch back; a large one runs in chunks with other sessions' work between
them; a session that cannot grow fails the whole job and changes nothing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from harness.engine_run import Harness, assert_same_state, run
from harness.tensors import random_tensor
from reference import attention_ref, rel_l2

from q8kv.server.backends.base import PackedItems
from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import Geometry
from q8kv.server.engine import PackedBatch
from q8kv.server.errors import Aborted, InvalidArgument, NotFound, ResourceExhausted

GEO = Geometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=400)


class Recording(NumpyBackend):
    """Records every packed call as (starts, n) and every item call as its item count; fails
    the packed call number ``fail_at`` (0-based) when set."""

    fail_at: int | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list = []

    def attend_packed(self, batch: PackedItems) -> np.ndarray:
        packed = [c for c in self.calls if isinstance(c, tuple)]
        self.calls.append((batch.starts.tolist(), batch.n))
        if self.fail_at == len(packed):
            raise RuntimeError("device lost")
        return super().attend_packed(batch)

    def append_and_attend(self, items):
        self.calls.append(len(items))
        return super().append_and_attend(items)


def packed(h: Harness, sessions, n: int, layer: int = 0, dtype=np.float32, expected=None):
    g = sessions[0].geometry
    b = len(sessions)
    return PackedBatch(
        [s.id for s in sessions], layer,
        random_tensor(h.rng, (b, n, g.num_heads, g.head_dim), dtype),
        random_tensor(h.rng, (b, n, g.num_kv_heads, g.head_dim), dtype),
        random_tensor(h.rng, (b, n, g.num_kv_heads, g.head_dim), dtype),
        expected,
    )


async def check(h: Harness, batch: PackedBatch, out: np.ndarray, lengths: list[int]) -> None:
    """Each session's output equals the float64 reference over its cache as it stands."""
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    n = batch.q.shape[1]
    for b, sid in enumerate(batch.session_ids):
        session = h.store.get(sid)
        table = session.layers[batch.layer].page_table()
        k, v = await h.engine.call(
            lambda s=session, t=table, b=b: h.engine.backend.dequantize(s.layout, t, 0, lengths[b])
        )
        want = attention_ref(batch.q[b], k, v, lengths[b] - n, session.softmax_scale)
        tolerance = 1e-5 if out.dtype == np.float32 else 2e-3
        assert rel_l2(out[b].astype(np.float32), want) < tolerance


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_coalesced_with_item_jobs_in_queue_order(dtype) -> None:
    async def body(h: Harness) -> None:
        sessions = [await h.create(GEO) for _ in range(4)]
        for i, s in enumerate(sessions):
            await h.append(h.request(s, 0, 3 + 5 * i))
        before = list(h.engine.backend.calls)
        first = h.request(sessions[1], 0, 2)  # queued before the packed job: seen by it
        batch = packed(h, sessions, 1, dtype=dtype)
        after = h.request(sessions[2], 0, 1)  # queued after it: sees its token
        results = await h.coalesced(
            lambda: h.append(first),
            lambda: h.engine.attend_batch(batch),
            lambda: h.append(after),
        )
        assert not any(isinstance(r, BaseException) for r in results), results
        out, lengths = results[1]
        assert lengths == [4, 11, 14, 19]
        assert results[2][0][1] == 15
        assert h.engine.backend.calls[len(before):] == [1, ([3, 10, 13, 18], 1), 1]
        assert h.batches[-1] == 6  # one batch: 1 + 4 + 1 items
        await check(h, batch, out, lengths)
        h.store.check_invariants()

    run(body, backend_cls=Recording)


def test_a_failed_packed_call_rolls_back_every_job_of_the_batch() -> None:
    async def body(h: Harness) -> None:
        sessions = [await h.create(GEO) for _ in range(3)]
        for s in sessions:
            await h.append(h.request(s, 1, 7))
        h.engine.backend.fail_at = 0
        state = await h.snapshot()
        results = await h.coalesced(
            lambda: h.append(h.request(sessions[0], 1, 2)),
            lambda: h.engine.attend_batch(packed(h, sessions, 2, layer=1)),
        )
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert_same_state(state, await h.snapshot())
        h.store.check_invariants()

    run(body, backend_cls=Recording)


def test_a_large_packed_job_runs_in_chunks_with_other_work_between() -> None:
    async def body(h: Harness) -> None:
        sessions = [await h.create(GEO) for _ in range(3)]
        other = await h.create(GEO)
        for i, s in enumerate(sessions[1:], 1):
            await h.append(h.request(s, 0, 4 * i))
        await h.append(h.request(other, 0, 5))
        batch = packed(h, sessions, 50, expected=[0, 4, 8])  # 150 tokens, 3 x 16 per call
        decode = h.request(other, 0, 1)
        calls = h.engine.backend.calls
        mark = len(calls)
        results = await h.coalesced(
            lambda: h.engine.attend_batch(batch), lambda: h.append(decode)
        )
        out, lengths = results[0]
        assert lengths == [50, 54, 58] and results[1][0][1] == 6
        done = calls[mark:]
        assert done[0] == ([0, 4, 8], 16) and done[1] == 1  # the decode after the first chunk
        assert done[2:] == [([16, 20, 24], 16), ([32, 36, 40], 16), ([48, 52, 56], 2)]
        await check(h, batch, out, lengths)
        h.store.check_invariants()

    run(body, backend_cls=Recording, prefill_chunk_tokens=48)


def test_a_chunk_failing_midway_changes_nothing() -> None:
    async def body(h: Harness) -> None:
        sessions = [await h.create(GEO) for _ in range(2)]
        await h.append(h.request(sessions[0], 0, 9))
        h.engine.backend.fail_at = 1
        state = await h.snapshot()
        with pytest.raises(RuntimeError, match="device lost"):
            await h.engine.attend_batch(packed(h, sessions, 40))
        assert_same_state(state, await h.snapshot())
        h.store.check_invariants()

    run(body, backend_cls=Recording, prefill_chunk_tokens=32)


def test_a_session_that_cannot_grow_fails_the_job_and_changes_nothing() -> None:
    async def body(h: Harness) -> None:
        sessions = [await h.create(GEO) for _ in range(3)]
        for s in sessions:
            await h.append(h.request(s, 0, 16))  # one full page each
        state = await h.snapshot()
        free = h.store.pool.free_pages
        # The first two take the last free pages; the third finds none.
        batch = packed(h, sessions, 16 * (free // 2))
        with pytest.raises(ResourceExhausted) as info:
            await h.engine.attend_batch(batch)
        assert info.value.message.startswith(f"batch[2] (session {sessions[2].id!r}): ")
        assert_same_state(state, await h.snapshot())
        h.store.check_invariants()
        out, lengths = await h.engine.attend_batch(packed(h, sessions[:2], 1))
        assert lengths == [17, 17]

    run(body, backend_cls=Recording, num_pages=10)


def test_inline_and_worker_paths_give_the_same_answer() -> None:
    """A small packed job alone runs inline on the loop; queued, on the worker."""

    async def body(h: Harness) -> None:
        sessions = [await h.create(GEO) for _ in range(5)]
        for s in sessions:
            await h.append(h.request(s, 0, 6))
        batch = packed(h, sessions, 1, dtype=np.float16)
        out, lengths = await h.engine.attend_batch(batch)
        assert lengths == [7] * 5
        await check(h, batch, out, lengths)
        more = [packed(h, sessions, 1) for _ in range(3)]
        results = await asyncio.gather(*(h.engine.attend_batch(b) for b in more))
        assert [r[1] for r in results] == [[8] * 5, [9] * 5, [10] * 5]
        await check(h, more[-1], results[-1][0], [10] * 5)

    run(body, backend_cls=Recording)


def test_a_packed_call_is_a_use_of_each_session_only_when_it_lands() -> None:
    """The lookups restart every session's idle clock, together, once the whole job passed
    its checks; a job refused (an unknown session at index 2) leaves the clocks alone."""

    async def body(h: Harness) -> None:
        sessions = [await h.create(GEO) for _ in range(3)]
        for s in sessions:
            s.last_used_mono -= 100.0
        clocks = [s.last_used_mono for s in sessions]
        refused = packed(h, sessions, 1)
        refused.session_ids[2] = "no-such-session"
        with pytest.raises(Exception, match=r"batch\[2\] \(session 'no-such-session'\)"):
            await h.engine.attend_batch(refused)
        assert [s.last_used_mono for s in sessions] == clocks
        await h.engine.attend_batch(packed(h, sessions, 1))
        assert all(s.last_used_mono > c + 50.0 for s, c in zip(sessions, clocks, strict=True))
        assert len({s.last_used_mono for s in sessions}) == 1

    run(body, backend_cls=Recording)


def test_the_first_session_at_fault_is_named_whatever_fails_after_it() -> None:
    """Checks of all sessions at once (the common case) or one by one (to name a failure)
    answer alike: the error is the first failing session's own, later faults in the same
    call (an unknown session) unseen; nothing changes and nothing stays pinned."""

    async def body(h: Harness) -> None:
        short = Geometry(1, GEO.num_heads, GEO.num_kv_heads, GEO.head_dim, GEO.max_len)
        wide = Geometry(2, 2 * GEO.num_heads, GEO.num_kv_heads, GEO.head_dim, GEO.max_len)
        sessions = [await h.create(g) for g in (GEO, GEO, short, wide, GEO)]
        assert sessions[0].layout is sessions[4].layout is not sessions[3].layout
        for s in sessions:
            await h.append(h.request(s, 0, 5))
        state = await h.snapshot()
        shape, layer = "q.shape: expected [n, 8, 64]", "layer: expected 0..0"
        cases = [  # (sessions, call, the error, the batch index it names, its text)
            ([0, 1, 3, 4], {}, InvalidArgument, 2, shape),
            ([0], {"wide_at": 0}, InvalidArgument, 0, shape),  # every session not as q
            ([0, 1, 3, 4], {"missing_at": 3}, InvalidArgument, 2, shape),
            ([0, 1, 2], {"layer": 1, "missing_at": 0}, NotFound, 0, "session_id: no session"),
            ([0, 1, 2, 4], {"layer": 1}, InvalidArgument, 2, layer),
            ([0, 1, 2, 4], {"layer": 1, "missing_at": 3}, InvalidArgument, 2, layer),
            ([0, 1, 4], {"expected": [5, 4, 5]}, Aborted, 1, "expected_length"),
            ([0, 1, 4], {"expected": [5, 4, 5], "missing_at": 2}, Aborted, 1, "expected_length"),
            ([0, 1], {"n": 0}, InvalidArgument, 0, "q.shape[0]: expected >= 1"),
            ([0, 1], {"n": 0, "missing_at": 1}, InvalidArgument, 0, "q.shape[0]: expected >= 1"),
        ]
        for picked, how, error, index, text in cases:
            batch = packed(h, [sessions[i] for i in picked], how.get("n", 1), how.get("layer", 0),
                           expected=how.get("expected"))  # fmt: skip
            if "wide_at" in how:  # q/k/v of GEO's shape for the wide session
                batch.session_ids[how["wide_at"]] = sessions[3].id
            if "missing_at" in how:
                batch.session_ids[how["missing_at"]] = "no-such-session"
            with pytest.raises(error) as info:
                await h.engine.attend_batch(batch)
            sid = batch.session_ids[index]
            assert info.value.message.startswith(f"batch[{index}] (session {sid!r}): {text}")
            assert_same_state(state, await h.snapshot())
            assert all(s.pins == 0 for s in sessions)
            h.store.check_invariants()
        out, lengths = await h.engine.attend_batch(packed(h, sessions[:2], 1, expected=[5, 5]))
        assert lengths == [6, 6]

    run(body, backend_cls=Recording)
