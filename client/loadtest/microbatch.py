"""One micro-batch of a q8kv-loadtest orchestrator: its sessions, their local copies (for
--verify), and its sequence loop (prefill, decode steps, reset after an error); run.py
describes the load they make together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

import grpc
import numpy as np

from q8kv.client import AttendResult, Q8KVError

from .state import CallFailed, StopRun
from .verify import LayerCopy, check

if TYPE_CHECKING:
    from .run import Orchestrator

BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0
T = TypeVar("T")


class MicroBatch:
    """One micro-batch of an orchestrator: its sessions (one call's items, or one packed
    AttendBatch with --packed), their local copies, its sequence loop."""

    def __init__(self, owner: Orchestrator, lane: int) -> None:
        self.owner = owner
        self.client = owner.client
        self.shared = owner.shared
        self.spec = owner.shared.spec
        self.rng = np.random.default_rng([self.spec.seed, owner.index, lane])
        self.session_ids = [
            f"loadtest-{self.shared.run_id}-{owner.index}-{lane}-{j}"
            for j in range(self.spec.batch)
        ]
        self.copies: dict[str, list[LayerCopy]] = {}
        if self.spec.verify > 0:
            self.copies = {
                sid: [
                    LayerCopy(self.spec.max_len, self.spec.kv_heads, self.spec.head_dim)
                    for _ in range(self.spec.layers)
                ]
                for sid in self.session_ids
            }
        self.scale = 1.0 / float(np.sqrt(self.spec.head_dim))

    # -- set-up and clean-up ---------------------------------------------------------------

    async def create(self) -> None:
        s = self.spec
        for sid in self.session_ids:
            await self.client.create_session(
                num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                head_dim=s.head_dim, max_len=s.max_len, session_id=sid,
            )
            self.shared.sessions.add(sid)

    async def first_prefill(self) -> None:
        """--untimed-prefill: the first sequence's prefill, before the clock starts."""
        for layer in range(self.spec.layers):
            await self._call("prefill", layer, self.spec.prefill, timed=False)

    async def reset(self) -> None:
        """Empty every session (create it again if the server lost it), and the copies."""
        for sid in self.session_ids:
            try:
                await self.client.truncate_session(sid, 0)
            except Q8KVError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                self.shared.sessions.discard(sid)
                s = self.spec
                await self.client.create_session(
                    num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                    head_dim=s.head_dim, max_len=s.max_len, session_id=sid,
                )
                self.shared.sessions.add(sid)
            for copy in self.copies.get(sid, ()):
                copy.reset()

    # -- the load --------------------------------------------------------------------------

    async def run(self, skip_first_prefill: bool) -> None:
        backoff = BACKOFF_FIRST
        skip_prefill = skip_first_prefill
        dirty = False  # the sessions hold a finished or failed sequence: reset first
        while True:
            try:
                admitted = dirty
                if dirty:
                    await self._admitted_reset()
                dirty = True
                await self._sequence(skip_prefill, admitted)
                backoff = BACKOFF_FIRST
            except StopRun:
                return
            except (CallFailed, Q8KVError) as exc:
                error = exc.error if isinstance(exc, CallFailed) else exc
                if error.request_id is None:  # the stream itself may be broken
                    await self.owner.close_stream()
                self.shared.saw(error)
                if self.shared.stopped:
                    return
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX)
            skip_prefill = False

    async def _admitted_reset(self) -> None:
        """The next sequence's first call admitted, then the sessions emptied: a run whose
        budget ends here leaves them as its last call did (the end-of-load scrape counts
        them) and resets nothing after it. A failed reset gives the budget back: the call
        it was admitted for never went."""
        await self._admit()
        try:
            await self.reset()
        except (CallFailed, Q8KVError):
            self.shared.refund()
            raise

    async def _sequence(self, skip_prefill: bool, admitted: bool = False) -> None:
        """The sequence's calls; ``admitted``: its first call's budget is taken already."""
        calls = []
        if self.spec.prefill and not skip_prefill:
            calls += [("prefill", layer, self.spec.prefill) for layer in range(self.spec.layers)]
        calls += [("decode", layer, 1) for _ in range(self.spec.steps)
                  for layer in range(self.spec.layers)]  # fmt: skip
        for i, (kind, layer, n) in enumerate(calls):
            await self._call(kind, layer, n, admitted=admitted and i == 0)

    async def _admit(self) -> None:
        """One timed call's turn: its slot of the open-loop schedule and its budget."""
        await self.shared.pace()
        if not self.shared.take():
            raise StopRun

    def _tensors(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q [B, n, H, D], k and v [B, n, KVH, D] for the micro-batch's B sessions."""
        s, dtype = self.spec, self.spec.np_dtype
        b = len(self.session_ids)
        q = self.rng.standard_normal((b, n, s.heads, s.head_dim), dtype=np.float32)
        kv = self.rng.standard_normal((2, b, n, s.kv_heads, s.head_dim), dtype=np.float32)
        return q.astype(dtype), kv[0].astype(dtype), kv[1].astype(dtype)

    async def _send(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> list:
        """One call (packed: AttendBatch, split by the client to its message limit; else
        AppendAndAttend with one item per session) -> an AttendResult per session."""
        sids = self.session_ids
        if self.spec.packed:
            if self.spec.streaming:
                call = self.owner.open_stream().attend_batch
            else:
                call = self.client.attend_batch
            batch = await self._bounded(call(layer, sids, q, k, v, with_lengths=True))
            return [AttendResult(batch.output[b], n) for b, n in enumerate(batch.lengths)]
        items = [(sid, layer, q[b], k[b], v[b]) for b, sid in enumerate(sids)]
        if not self.spec.streaming:
            return await self.client.append_and_attend_batch(items, with_lengths=True)
        return await self._bounded(self.owner.open_stream().attend(items, with_lengths=True))

    async def _bounded(self, call: Awaitable[T]) -> T:
        """A unary call has its deadline; a stream's answers get --timeout here."""
        if not self.spec.streaming:
            return await call
        try:
            return await asyncio.wait_for(call, self.spec.timeout)
        except TimeoutError:
            raise Q8KVError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"stream: no answer within --timeout {self.spec.timeout:g}s",
            ) from None

    async def _call(
        self, kind: str, layer: int, n: int, timed: bool = True, admitted: bool = False
    ) -> None:
        shared = self.shared
        if timed and not admitted:
            await self._admit()
        tensors = self._tensors(n)
        started = time.perf_counter()
        try:
            results = await self._send(layer, *tensors)
            error = None
        except Q8KVError as exc:
            results, error = [], exc
        latency = time.perf_counter() - started
        items = len(self.session_ids)
        tokens = n * items
        if timed:
            status = "OK" if error is None else error.code.name
            shared.recorder.record(
                kind, started - shared.t0, latency, items, tokens, status,
                "" if error is None else error.message,
            )
        if error is not None:
            raise CallFailed(error)
        shared.saw(None)
        if not timed:
            shared.setup_calls += 1
            shared.setup_tokens += tokens
        if self.copies:
            self._keep_and_verify(layer, tensors, results)

    def _keep_and_verify(self, layer: int, tensors: tuple, results: list) -> None:
        verify = self.rng.random() < self.spec.verify
        q, k, v = tensors
        for b, (sid, result) in enumerate(zip(self.session_ids, results, strict=True)):
            copy = self.copies[sid][layer]
            copy.append(k[b], v[b])
            if result.length != copy.length:
                self._mismatch(f"{sid} layer {layer}: length {result.length}, "
                               f"expected {copy.length}")
            if not verify:
                continue
            error = check(copy, q[b], result.output, self.scale)
            shared = self.shared
            shared.verified += 1
            if not error <= self.spec.tolerance:  # NaN counts as a mismatch too
                self._mismatch(f"{sid} layer {layer} at length {copy.length}: relative L2 "
                               f"error {error:.3g} > tolerance {self.spec.tolerance:g}")
            if np.isfinite(error):
                shared.max_rel_error = max(shared.max_rel_error, error)

    def _mismatch(self, message: str) -> None:
        self.shared.mismatches += 1
        if len(self.shared.first_mismatches) < 10:
            self.shared.first_mismatches.append(message)
