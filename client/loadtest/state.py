"""What the pieces of a q8kv-loadtest run share: the load's spec (the checked flags), the
state of the run every orchestrator updates (budget, schedule, counters, live sessions),
and the exceptions that end a call or the run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np

from q8kv.client import Q8KVError
from q8kv.client.channel import DEFAULT_MAX_MESSAGE_BYTES

from .stats import Recorder

# Consecutive UNAVAILABLE answers (calls and resets alike, with no success between) after
# which the run stops: the server is gone, retrying for the rest of --duration only fills
# the report with the same error.
UNAVAILABLE_LIMIT = 8


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

    def refund(self) -> None:
        """Give back a call's budget that ``take`` granted but no call used."""
        self.issued -= 1

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
