"""Driving a real Engine in a test: a fresh engine over a numpy backend run for the length
of one ``asyncio.run`` (``run``), and the ``Harness`` a test body gets (sessions, requests,
coalesced calls, state snapshots, reference checks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from reference import attention_ref, rel_l2

from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import Geometry, PagePool, Session, SessionStore
from q8kv.server.engine import AppendRequest, Engine, EngineObserver

from .engine import TIMEOUT, engine_held
from .tensors import qkv, random_tensor

PCB = 4096  # page code bytes: geometry (4, 2, 64) -> 16 tokens per page
GEO = Geometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=200)


class Harness:
    """An engine, its store and backend, the batch sizes it ran, and a random source."""

    def __init__(self, engine: Engine, seed: int) -> None:
        self.engine = engine
        self.store = engine.store
        self.rng = np.random.default_rng(seed)
        self.batches: list[int] = []
        engine.observer = EngineObserver(on_batch=lambda items, s: self.batches.append(items))

    async def create(self, geometry: Geometry = GEO, **kwargs: Any) -> Session:
        return await self.engine.call(lambda: self.store.create(geometry, **kwargs))

    def request(self, session: Session, layer: int, n: int, dtype=np.float32) -> AppendRequest:
        return AppendRequest(
            session.id, layer, *qkv(self.rng, n, session.geometry, dtype, tensor=random_tensor)
        )

    async def append(self, *requests: AppendRequest, **kwargs: Any):
        return await self.engine.append_and_attend(list(requests), **kwargs)

    async def coalesced(self, *jobs: Callable[[], Awaitable[Any]]) -> list[Any]:
        """Start every job while the engine is held busy, release it, and gather the results
        (exceptions returned, not raised)."""
        async with engine_held(self.engine, TIMEOUT):
            tasks = [asyncio.ensure_future(job()) for job in jobs]
            await asyncio.sleep(0.02)  # every task has queued its job behind the hold
        return await asyncio.gather(*tasks, return_exceptions=True)

    async def snapshot(self) -> tuple[dict, int, int]:
        """Every layer's (length, pages, K, V), the pool's free pages, the value counter."""

        def take() -> tuple[dict, int, int]:
            state = {}
            for s in self.store:
                layers = []
                for layer in s.layers:
                    k, v = self.engine.backend.dequantize(
                        s.layout, layer.page_table(), 0, layer.length
                    )
                    layers.append((layer.length, list(layer.pages), k, v))
                state[s.id] = layers
            return state, self.store.pool.free_pages, self.store.cached_values

        return await self.engine.call(take)

    async def check_output(self, request: AppendRequest, out: np.ndarray, new_length: int):
        """The output of ``request`` equals the float64 reference over the layer's cache as
        it stands now (tokens appended later sit past ``new_length`` and are not read)."""
        session = self.store.get(request.session_id)
        layer = session.layers[request.layer]
        k, v = await self.engine.call(
            lambda: self.engine.backend.dequantize(
                session.layout, layer.page_table(), 0, new_length
            )
        )
        n = request.q.shape[0]
        want = attention_ref(request.q, k, v, new_length - n, session.softmax_scale)
        assert out.dtype == np.float32 and out.shape == request.q.shape
        assert np.all(np.isfinite(out))
        assert rel_l2(out, want) < 1e-5


def run(
    body: Callable[[Harness], Awaitable[Any]],
    *,
    seed: int = 0,
    num_pages: int = 256,
    backend_cls: type[NumpyBackend] = NumpyBackend,
    **engine_kwargs: Any,
) -> Any:
    """Run ``body`` against a fresh started engine; always stop the worker."""
    store = SessionStore(PagePool(num_pages, PCB), max_sessions=32)
    engine = Engine(backend_cls(num_pages, PCB), store, **engine_kwargs)
    engine.start()
    try:
        return asyncio.run(asyncio.wait_for(body(Harness(engine, seed)), TIMEOUT))
    finally:
        engine.stop(timeout=5)
        assert not engine.worker.alive


def assert_same_state(before: tuple[dict, int, int], after: tuple[dict, int, int]) -> None:
    """Lengths, page tables, dequantized K/V of every layer, free pages, value counter."""
    state_b, free_b, values_b = before
    state_a, free_a, values_a = after
    assert free_a == free_b and values_a == values_b
    assert state_a.keys() == state_b.keys()
    for sid, layers in state_b.items():
        for (len_b, pages_b, k_b, v_b), (len_a, pages_a, k_a, v_a) in zip(
            layers, state_a[sid], strict=True
        ):
            assert (len_a, pages_a) == (len_b, pages_b), sid
            np.testing.assert_array_equal(k_a, k_b)
            np.testing.assert_array_equal(v_a, v_b)


