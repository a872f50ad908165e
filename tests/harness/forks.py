"""Forks that diverge, on an Engine over any backend, checked against sessions built from
scratch: every session's history (its appends and truncates, a fork's inherited from its
source up to the fork) is replayed on a fresh session, and each append a branch made
itself must give the same output as the replay's; every layer's cache must dequantize the
same, bit for bit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from harness.engine import engine_held
from harness.tensors import qkv
from q8kv.server.cache import Geometry
from q8kv.server.engine import AppendRequest, Engine

TENANT = "forks"


@dataclass
class Step:
    """One call of a history: an append (per layer (q, k, v), and the outputs the branch
    got when it made the call itself) or a truncate."""

    appended: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    truncate: int | None = None
    outputs: list[np.ndarray] | None = None  # None: inherited from the source


@dataclass
class Branches:
    engine: Engine
    geometry: Geometry
    rng: np.random.Generator
    history: dict[str, list[Step]] = field(default_factory=dict)
    # The tenant of check()'s from-scratch twins: another tenant than the branches' keeps a
    # tight tenant limit from refusing the replay of a tree that fills it.
    replay_tenant: str = TENANT

    async def create(self, name: str) -> None:
        await self.engine.create_session(self.geometry, name, 0, None, TENANT)
        self.history[name] = []

    def _step(self, n: int) -> Step:
        layers = range(self.geometry.num_layers)
        return Step(appended=[qkv(self.rng, n, self.geometry) for _ in layers])

    async def _run(self, name: str, step: Step, tenant: str = TENANT) -> list[np.ndarray]:
        requests = [AppendRequest(name, layer, *t) for layer, t in enumerate(step.appended)]
        return [out for out, _ in await self.engine.append_and_attend(requests, tenant)]

    async def append(self, name: str, n: int) -> None:
        step = self._step(n)
        step.outputs = await self._run(name, step)
        self.history[name].append(step)

    async def append_together(self, names: list[str], n: int) -> None:
        """One append per branch, queued while the worker is held: one coalesced batch."""
        steps = [self._step(n) for _ in names]
        async with engine_held(self.engine):
            pairs = zip(names, steps, strict=True)
            tasks = [asyncio.ensure_future(self._run(nm, s)) for nm, s in pairs]
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*tasks)
        for name, step, outputs in zip(names, steps, results, strict=True):
            step.outputs = outputs
            self.history[name].append(step)

    async def fork(self, name: str, source: str, length: int | None = None) -> None:
        await self.engine.fork_session(source, TENANT, name, length, 0)
        inherited = [Step(s.appended, s.truncate) for s in self.history[source]]
        self.history[name] = inherited + ([] if length is None else [Step(truncate=length)])

    async def truncate(self, name: str, length: int) -> None:
        await self.engine.truncate_session(name, TENANT, length)
        self.history[name].append(Step(truncate=length))

    async def delete(self, name: str) -> None:
        await self.engine.delete_session(name, TENANT)
        del self.history[name]

    async def layers(self, name: str, tenant: str = TENANT) -> list[tuple[np.ndarray, np.ndarray]]:
        return [
            (k, v)
            for layer in range(self.geometry.num_layers)
            for k, v, _ in [await self.engine.dequantize(name, tenant, layer, 0, None)]
        ]

    async def check(self, same: Callable[[np.ndarray, np.ndarray], None]) -> int:
        """Replay every live session from scratch; ``same(branch, replay)`` on each output
        a branch computed itself; caches must match exactly. Returns the outputs checked."""
        checked = 0
        for name, steps in list(self.history.items()):
            twin, tenant = f"scratch-{name}", self.replay_tenant
            await self.engine.create_session(self.geometry, twin, 0, None, tenant)
            for step in steps:
                if step.truncate is not None:
                    await self.engine.truncate_session(twin, tenant, step.truncate)
                    continue
                replayed = await self._run(twin, step, tenant)
                for mine, theirs in zip(step.outputs or [], replayed, strict=False):
                    same(mine, theirs)
                    checked += 1
            mine, theirs = await self.layers(name), await self.layers(twin, tenant)
            for (k, v), (k2, v2) in zip(mine, theirs, strict=True):
                np.testing.assert_array_equal(k, k2)
                np.testing.assert_array_equal(v, v2)
            await self.engine.delete_session(twin, tenant)
        return checked
