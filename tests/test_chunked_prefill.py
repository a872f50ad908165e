"""Chunked prefill: a call of more new tokens than ``prefill_chunk_tokens`` runs in chunks,
and queued appends of other sessions run between the chunks, so a long prompt does not
stall everyone else's decode. Checked against the float64 reference and against the same
call unchunked; per-session order and all-or-nothing hold."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
from harness.engine_run import Harness, assert_same_state, run
from harness.tensors import random_tensor
from reference import attention_ref, rel_l2

from q8kv.server.backends.base import AttendItem
from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import Geometry
from q8kv.server.engine import AppendRequest

GEO = Geometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, max_len=4096)
CHUNK = 64


class RecordingBackend(NumpyBackend):
    """Records (first session-page id, start, n) of every item of every call, and can be
    slowed down so that work queues up behind a prefill."""

    delay = 0.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[list[tuple[int, int]]] = []
        self.lock = threading.Lock()

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        with self.lock:
            self.calls.append([(item.start, item.n) for item in items])
        if self.delay:
            time.sleep(self.delay)
        return super().append_and_attend(items)


class FailingOnThirdCall(RecordingBackend):
    """Fails the third device call (a chunk in the middle of a prefill)."""

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        if len(self.calls) == 2:
            self.calls.append([])
            raise RuntimeError("device lost")
        return super().append_and_attend(items)


def _request(h: Harness, session, n: int) -> AppendRequest:
    g = session.geometry
    return AppendRequest(
        session.id, 0,
        random_tensor(h.rng, (n, g.num_heads, g.head_dim), np.float32),
        random_tensor(h.rng, (n, g.num_kv_heads, g.head_dim), np.float32),
        random_tensor(h.rng, (n, g.num_kv_heads, g.head_dim), np.float32),
    )


def test_a_long_prefill_runs_in_chunks_and_matches_the_reference() -> None:
    """300 new tokens over a 20-token cache run as 64-token device calls; the output equals
    the float64 reference over the dequantized cache and the unchunked engine's output."""

    async def body(h: Harness) -> None:
        s = await h.create(GEO)
        await h.append(_request(h, s, 20))
        request = _request(h, s, 300)
        before = len(h.engine.backend.calls)
        [(out, length)] = await h.append(request)
        starts = [call[0] for call in h.engine.backend.calls[before:]]
        assert starts == [(20 + first, min(CHUNK, 300 - first)) for first in range(0, 300, CHUNK)]
        assert length == 320
        await h.check_output(request, out, length)
        h.store.check_invariants()
        return request, out

    request, chunked = run(body, seed=31, backend_cls=RecordingBackend, prefill_chunk_tokens=CHUNK)

    async def unchunked(h: Harness) -> np.ndarray:
        s = await h.create(GEO)
        await h.append(_request(h, s, 20))
        [(out, _)] = await h.append(AppendRequest(s.id, 0, request.q, request.k, request.v))
        return out

    # Same seed: the same 20-token prefix; the 300 tokens are the ones sent above.
    whole = run(unchunked, seed=31, backend_cls=RecordingBackend)
    assert rel_l2(chunked, whole) < 1e-6


def test_other_sessions_decode_between_the_chunks_and_the_prefills_session_waits() -> None:
    """While a 640-token prefill of session A runs (10 slow chunks), decode steps of B land
    between its chunks; a decode step of A queued meanwhile runs after the prefill, at the
    prefill's end length (per-session order)."""

    async def body(h: Harness) -> None:
        a, b = await h.create(GEO), await h.create(GEO)
        await h.append(_request(h, b, 8))
        h.engine.backend.delay = 0.005
        prefill = asyncio.ensure_future(h.append(_request(h, a, 640)))
        await asyncio.sleep(0.012)  # the prefill is running its first chunks
        a_step = asyncio.ensure_future(h.append(_request(h, a, 1)))
        b_steps = []
        for _ in range(4):
            b_steps.append(await h.append(_request(h, b, 1)))
        b_done = time.monotonic()
        [(_, a_len)] = await prefill
        prefill_done = time.monotonic()
        [(_, step_len)] = await a_step
        assert a_len == 640 and step_len == 641
        assert [r[0][1] for r in b_steps] == [9, 10, 11, 12]
        assert b_done < prefill_done  # B did not wait for A's whole prompt
        # The device calls: B's decode steps sit between A's chunks.
        calls = h.engine.backend.calls
        chunk_calls = [i for i, c in enumerate(calls) if c and c[0][1] == CHUNK]
        decode_calls = [i for i, c in enumerate(calls) if c and c[0][1] == 1]
        assert chunk_calls[0] < decode_calls[0] < chunk_calls[-1]
        h.store.check_invariants()

    run(body, seed=32, backend_cls=RecordingBackend, prefill_chunk_tokens=CHUNK)


def test_a_chunk_that_fails_rolls_the_whole_prefill_back() -> None:
    """The device fails in the middle of a chunked prefill: the call fails, the layer is as
    before (length, pages, contents), and the engine keeps serving."""

    async def body(h: Harness) -> None:
        s = await h.create(GEO)
        await h.append(_request(h, s, 10))  # device call 1
        before = await h.snapshot()
        try:
            await h.append(_request(h, s, 200))  # call 2 is chunk 1, call 3 fails
        except RuntimeError:
            pass
        else:
            raise AssertionError("the failing prefill answered OK")
        assert_same_state(before, await h.snapshot())
        h.store.check_invariants()
        request = _request(h, s, 3)
        [(out, length)] = await h.append(request)
        assert length == 13
        k, v = await h.engine.call(
            lambda: h.engine.backend.dequantize(s.layout, s.layers[0].page_table(), 0, 13)
        )
        assert rel_l2(out, attention_ref(request.q, k, v, 10, s.softmax_scale)) < 1e-5

    run(body, seed=33, backend_cls=FailingOnThirdCall, prefill_chunk_tokens=CHUNK)
