"""The ordered executor: one worker thread runs every job that touches the cache, in
arrival order, so no lock is held across a kernel and the calls on one session apply in the
order they came.

A small append that finds itself the only one in flight and the worker idle runs right on
the event loop instead: two thread hand-offs cost more than a decode step, and there is
nothing to batch it with. The worker counts its own appends in flight for that choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import ServiceError, Unavailable
from .jobs import AppendJob, CallJob, Job, answer, discard_outcome

log = logging.getLogger("q8kv.engine")

# Largest append (new tokens over all items) that may run inline on the event loop.
INLINE_MAX_TOKENS = 64


def run_fn(fn: Callable[[], Any]) -> Any:
    """``fn()``, its errors as the caller gets them: a ServiceError as it is; a bug is
    logged and answered INTERNAL (the engine keeps serving); no host memory is
    RESOURCE_EXHAUSTED."""
    try:
        return fn()
    except ServiceError:
        raise
    except Exception as exc:
        if not isinstance(exc, MemoryError):
            log.exception("engine call failed")
        raise answer(exc) from None


class JobQueue:
    """The jobs waiting for the worker, and the lock every claim and hand-off takes."""

    def __init__(self) -> None:
        self.jobs: deque[Job | None] = deque()  # None: the worker's signal to end
        self.ready = threading.Condition()
        self.accepting = True
        self.busy = False  # a job is running, on the worker or inline on the event loop

    def put(self, job: Job | None, wake: bool = True) -> None:
        with self.ready:
            if job is not None and not self.accepting:
                raise Unavailable("server: shutting down, not accepting new work")
            self.jobs.append(job)
            if wake:
                self.ready.notify()


class Worker:
    """Runs every job in order, on its thread or inline: appends through ``execute(job)``,
    calls (``call``) itself."""

    def __init__(
        self, execute: Callable[[AppendJob], None], inline_when_idle: bool = True
    ) -> None:
        self.queue = JobQueue()
        self._execute = execute
        self.inline_when_idle = inline_when_idle
        self._appends_in_flight = 0
        self._thread = threading.Thread(target=self._run, name="q8kv-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued work, then end the worker thread."""
        with self.queue.ready:
            self.queue.accepting = False
        self.queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def call(self, fn: Callable[[], Any], inline: bool = False) -> Any:
        """Run ``fn`` on the worker, in order with every other job. ``inline``: ``fn`` is
        cheap (metadata only), so when nothing is queued or running it runs right here on
        the event loop: a thread hop each way costs more than the work, and the worker,
        woken for nothing to batch, competes with the next call for the CPU and the GIL."""
        if inline and self._claim_idle():
            try:
                return run_fn(fn)
            finally:
                self._release_idle()
        loop = asyncio.get_running_loop()
        job = CallJob(future=loop.create_future(), loop=loop, fn=fn)
        self.queue.put(job)
        return await self._outcome(job)

    def _claim_idle(self) -> bool:
        """Take the engine for work on the event loop, if nothing is queued or running
        (then everything that came before has been applied: order holds)."""
        queue = self.queue
        with queue.ready:
            if queue.jobs or queue.busy or not queue.accepting:
                return False
            queue.busy = True
            return True

    def _release_idle(self) -> None:
        queue = self.queue
        with queue.ready:
            queue.busy = False
            if queue.jobs:  # wake the worker only when it has something to do
                queue.ready.notify()

    async def append(self, job: AppendJob) -> Any:
        """Queue an append; inline when it is small, alone and the worker idle."""
        self._appends_in_flight += 1
        try:
            if self.inline_when_idle and job.tokens <= INLINE_MAX_TOKENS:
                return await self._maybe_inline(job)
            self.queue.put(job)
            return await self._outcome(job)
        finally:
            self._appends_in_flight -= 1

    def claim(self, job: Job) -> bool:
        """Whether the engine runs ``job``: not if its caller withdrew it first."""
        with self.queue.ready:
            if job.withdrawn or job.future.done():
                return False
            job.claimed = True
            return True

    def run_call(self, job: CallJob) -> Callable[[], None] | None:
        """Run the call's ``fn``; returns what answers its caller (None: withdrawn), for the
        worker to run once it is marked idle (see ``_run``)."""
        if not self.claim(job):
            return None
        try:
            result = run_fn(job.fn)
        except Exception as exc:
            return functools.partial(job.resolve, error=exc)
        return functools.partial(job.resolve, result)

    async def _outcome(self, job: Job) -> Any:
        """Wait for the job's answer. The caller going away (task cancelled) withdraws the
        job if the engine has not claimed it yet; a claimed job runs to its end and sets
        its future, whose answer then has no one to read it."""
        try:
            # Shielded: a cancelled caller must not cancel the future the worker answers.
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    def _withdraw(self, job: Job) -> None:
        with self.queue.ready:
            if not job.claimed:
                job.withdrawn = True
                with contextlib.suppress(ValueError):
                    self.queue.jobs.remove(job)
                job.future.cancel()
                return
        job.future.add_done_callback(discard_outcome)  # claimed: applied and answered

    async def _maybe_inline(self, job: AppendJob) -> Any:
        """Queue the job (its place in line is taken now, so order holds), give the event
        loop one turn so calls that arrived meanwhile can start and queue behind it, then
        run it right here if it is still alone and the worker idle. Otherwise hand it to
        the worker, which batches it with the others."""
        queue = self.queue
        queue.put(job, wake=False)
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._withdraw(job)
            raise
        with queue.ready:
            inline = (
                len(queue.jobs) == 1
                and queue.jobs[0] is job
                and not queue.busy
                and self._appends_in_flight == 1
            )
            if inline:
                queue.jobs.popleft()
                queue.busy = True
            else:
                queue.ready.notify()
        if inline:
            try:
                self._execute(job)
            finally:
                self._release_idle()
        return await self._outcome(job)

    def _run(self) -> None:
        queue = self.queue
        while True:
            with queue.ready:
                while not queue.jobs or queue.busy:
                    queue.ready.wait()
                job = queue.jobs.popleft()
                if job is None:
                    return
                queue.busy = True
            settle = None
            try:
                if isinstance(job, CallJob):
                    settle = self.run_call(job)
                else:
                    self._execute(job)
            finally:
                with queue.ready:
                    queue.busy = False
            # A call is answered only now: waking the event loop (a socket write) lets it
            # take the GIL, and a decode step the answer sets off must find the engine idle
            # (else it takes two thread hops instead of running inline).
            if settle is not None:
                settle()
