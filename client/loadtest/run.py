"""The load of q8kv-loadtest: virtual orchestrators driving sessions like model runners do.

Each orchestrator owns ``in_flight`` micro-batches of ``batch`` sessions each. A micro-
batch's sequence is: prefill ``prefill`` tokens (one call per layer, its sessions as the
call's items, or with ``packed`` as one AttendBatch), then ``steps`` decode steps, each one
call per layer with one token per session; then the sessions are truncated to 0 and the
next sequence starts. The calls of one micro-batch are sequential (a layer's output feeds
the next layer in a real model); an orchestrator's micro-batches run at once (a runner
overlaps one micro-batch's attention with the rest of the layer for another), and
``concurrency`` orchestrators run at once. Closed loop: each micro-batch calls again as
soon as its call returns. Open loop: calls start on a fixed schedule (``rate`` per second)
shared by all; a call whose slot comes while every micro-batch is busy starts late, and is
counted. A packed call larger than ``max_message_bytes`` is split by the client into calls
that fit (and still counts as one call).

A failed call changes nothing on the server (all or none; a split packed call may have
applied its first parts), and after a client-side timeout or a broken stream the client
cannot know, so after any error the micro-batch resets its sessions (truncate to 0, or
create them again if they are gone) and starts a new sequence: the local verification
copy always equals the server's cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from q8kv.client import AsyncClient, AsyncStream, AttendResult, Q8KVError
from q8kv.client.channel import DEFAULT_MAX_MESSAGE_BYTES

from .stats import Recorder
from .verify import LayerCopy, check

# Consecutive UNAVAILABLE answers (calls and resets alike, with no success between) after
# which the run stops: the server is gone, retrying for the rest of --duration only fills
# the report with the same error.
UNAVAILABLE_LIMIT = 8
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0
T = TypeVar("T")


@dataclass(frozen=True)
class LoadSpec:
    """Everything the load depends on (the CLI's flags, checked)."""

    target: str
    layers: int = 1
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 128
    dtype: str = "float32"
    prefill: int = 64
    steps: int = 16
    batch: int = 1
    in_flight: int = 1  # micro-batches per orchestrator, each its own ``batch`` sessions
    packed: bool = False  # one AttendBatch per call instead of an AppendAndAttend of items
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    concurrency: int = 4
    connections: int = 1
    duration: float | None = None
    requests: int | None = None
    rate: float | None = None
    streaming: bool = False
    token: str | None = None
    tls: str | None = None
    timeout: float = 20.0
    verify: float = 0.0
    tolerance: float = 1e-4
    untimed_prefill: bool = False
    seed: int = 0

    @property
    def max_len(self) -> int:
        return self.prefill + self.steps

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


class StopRun(Exception):
    """The budget (requests or duration) is spent, or the run was stopped."""


class CallFailed(Exception):
    """A call failed; it is recorded, the orchestrator resets its sessions."""

    def __init__(self, error: Q8KVError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class Shared:
    """State every orchestrator of one run shares (one event loop: no locks)."""

    spec: LoadSpec
    recorder: Recorder
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    t0: float = 0.0  # perf_counter() at the start of the timed phase
    deadline: float | None = None
    issued: int = 0
    next_slot: float = 0.0
    late_calls: int = 0
    stopped: bool = False
    abort_reason: str | None = None
    unavailable_streak: int = 0
    verified: int = 0
    mismatches: int = 0
    max_rel_error: float = 0.0
    first_mismatches: list[str] = field(default_factory=list)
    setup_calls: int = 0
    setup_tokens: int = 0
    sessions: set[str] = field(default_factory=set)  # live session ids (deleted at the end)

    def take(self) -> bool:
        """One call's worth of budget, or False when the run is over."""
        if self.stopped:
            return False
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return False
        if self.spec.requests is not None and self.issued >= self.spec.requests:
            return False
        self.issued += 1
        return True

    async def pace(self) -> None:
        """Open loop: wait for the next slot of the shared schedule."""
        if self.spec.rate is None:
            return
        slot = self.next_slot
        self.next_slot += 1.0 / self.spec.rate
        delay = slot - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1e-3:
            self.late_calls += 1

    def saw(self, error: Q8KVError | None) -> None:
        """Track consecutive UNAVAILABLE answers; stop the run when the server is gone."""
        if error is None or error.code != grpc.StatusCode.UNAVAILABLE:
            self.unavailable_streak = 0
            return
        self.unavailable_streak += 1
        limit = max(UNAVAILABLE_LIMIT, 2 * self.spec.concurrency * self.spec.in_flight)
        if self.unavailable_streak >= limit and not self.stopped:
            self.stopped = True
            self.abort_reason = (
                f"the server at {self.spec.target} stopped answering ({error}); "
                f"stopped the run after {self.unavailable_streak} UNAVAILABLE answers in a row"
            )


class Orchestrator:
    """One virtual model runner: ``in_flight`` micro-batches of ``batch`` sessions each,
    every one running its own sequence at once (as a runner overlaps the attention of one
    micro-batch with the rest of the layer for another), over one client and, with
    --streaming, one stream they share."""

    def __init__(self, index: int, client: AsyncClient, shared: Shared) -> None:
        self.index = index
        self.client = client
        self.shared = shared
        self.stream: AsyncStream | None = None
        self.micro_batches = [MicroBatch(self, lane) for lane in range(shared.spec.in_flight)]

    @property
    def session_ids(self) -> list[str]:
        return [sid for mb in self.micro_batches for sid in mb.session_ids]

    async def create(self) -> None:
        for mb in self.micro_batches:
            await mb.create()

    async def first_prefill(self) -> None:
        """--untimed-prefill: each micro-batch's first prefill, one after another."""
        for mb in self.micro_batches:
            await mb.first_prefill()

    async def run(self, skip_first_prefill: bool) -> None:
        """Every micro-batch's loop at once; a bug in one stops the others."""
        async with asyncio.TaskGroup() as group:
            for mb in self.micro_batches:
                group.create_task(mb.run(skip_first_prefill))

    def open_stream(self) -> AsyncStream:
        if self.stream is None:
            self.stream = self.client.stream(self.micro_batches[0].session_ids[0])
        return self.stream

    async def close_stream(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.close(), 2.0)


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
                if dirty:
                    await self.reset()
                    dirty = False
                dirty = True
                await self._sequence(skip_prefill)
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

    async def _sequence(self, skip_prefill: bool) -> None:
        if self.spec.prefill and not skip_prefill:
            for layer in range(self.spec.layers):
                await self._call("prefill", layer, self.spec.prefill)
        for _ in range(self.spec.steps):
            for layer in range(self.spec.layers):
                await self._call("decode", layer, 1)

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

    async def _call(self, kind: str, layer: int, n: int, timed: bool = True) -> None:
        shared = self.shared
        if timed:
            await shared.pace()
            if not shared.take():
                raise StopRun
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


async def delete_sessions(client: AsyncClient, shared: Shared, timeout: float = 5.0) -> int:
    """Delete every session the run made; returns how many could not be deleted. Gives up
    at the first UNAVAILABLE (the server is gone: every other try would wait too)."""
    semaphore = asyncio.Semaphore(32)
    gone = asyncio.Event()

    async def delete(sid: str) -> None:
        if gone.is_set():
            return
        async with semaphore:
            try:
                await asyncio.wait_for(client.delete_session(sid), timeout)
                shared.sessions.discard(sid)
            except Q8KVError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    shared.sessions.discard(sid)
                elif exc.code == grpc.StatusCode.UNAVAILABLE:
                    gone.set()
            except TimeoutError:
                gone.set()

    await asyncio.gather(*(delete(sid) for sid in list(shared.sessions)))
    return len(shared.sessions)


ProgressHook = Callable[[Shared], None]
