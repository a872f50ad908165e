"""Packed batches (AttendBatch): checked before anything is sent, and cut into calls that
fit ``max_message_bytes``.

Pure, like core.py: BatchPlan says which part of the caller's arrays each call carries,
builds its message, places its answer and names a failed part; Client, AsyncClient and
both streams (the shells) run the calls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from q8kv.v1 import kvcache_pb2 as pb
from q8kv.wire import TensorError, wire_dtype

from . import messages as m
from .errors import AlreadyApplied, Q8KVError, invalid_argument
from .types import BatchResult

# Per session of a call, besides its tokens: the id's tag and length, a packed varint of
# expected_lengths, and in the answer a varint of lengths (the id's own bytes are added).
ROW_OVERHEAD_BYTES = 16
# An error of a part names indices of that part; these prefixes are the caller's rows.
_ROW_FIELD = re.compile(r"^(batch|session_ids|expected_lengths)\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class BatchPart:
    """One call of a batch: sessions ``rows`` x tokens ``tokens`` of the caller's arrays."""

    index: int
    rows: slice
    tokens: slice


class BatchPlan:
    """A packed batch (one layer, B sessions, n new tokens each), checked before anything
    is sent and cut into ``parts`` that each fit ``max_message_bytes`` (request and answer,
    with a margin for the envelope): one part when it fits; else groups of sessions; else,
    when one session's row alone is too large (a long prefill), chunks of the tokens too,
    the chunks of each session in order (causal attention: chunked appends give the same
    outputs). Parts are sent one after another; ``put`` places each answer, ``result``
    gives the whole. Pure: the shells run the calls."""

    def __init__(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: Any,
        k: Any,
        v: Any,
        expected_lengths: Iterable[int] | None,
        max_message_bytes: int,
    ) -> None:
        if isinstance(sessions, str | bytes) or not isinstance(sessions, Iterable):
            raise invalid_argument(
                f"sessions: expected a sequence of session handles or ids, got "
                f"{type(sessions).__name__}"
            )
        self.ids = [m.session_id_of(s, f"sessions[{b}]") for b, s in enumerate(sessions)]
        self.layer = m.as_int(layer, "layer")
        self.q, self.k, self.v = (np.asarray(a) for a in (q, k, v))
        _check_batch_shapes(self.ids, self.q, self.k, self.v)
        _check_distinct(self.ids)
        self.expected = _expected_lengths(expected_lengths, len(self.ids))
        self.limit = int(max_message_bytes)
        self.routing_key: str | None = None  # the header of every part (set by the client)
        # q, k and v bytes of one token of one session (the output's are q's: fewer), and
        # a session's bytes besides its tokens (the longest id and the framing).
        self.token_bytes = sum(
            a.itemsize * a.shape[2] * a.shape[3] for a in (self.q, self.k, self.v)
        )
        longest_id = max((len(sid.encode()) for sid in self.ids), default=0)
        self.row_overhead = longest_id + ROW_OVERHEAD_BYTES
        self.parts = self._cut()
        self._whole: BatchResult | None = None  # the answer of a call that was not split
        self._output: np.ndarray | None = None
        self._lengths = [0] * len(self.ids)

    def message_bytes(self, rows: int, tokens: int) -> int:
        """An upper bound of the request of a call of ``rows`` sessions of ``tokens`` tokens
        each, envelope included (its answer is smaller: the output has q's bytes)."""
        return rows * (tokens * self.token_bytes + self.row_overhead) + m.ENVELOPE_BYTES

    def _cut(self) -> list[BatchPart]:
        sessions, n = self.q.shape[:2]
        if sessions == 0 or n == 0 or self.message_bytes(sessions, n) <= self.limit:
            return [BatchPart(0, slice(0, sessions), slice(0, n))]  # the server judges it
        if self.message_bytes(1, 1) > self.limit:
            raise Q8KVError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_message_bytes: expected at least {self.message_bytes(1, 1)} bytes (one "
                f"token of one session: {self.token_bytes} bytes of q, k and v, and the "
                f"message's envelope), got {self.limit}; this call needs "
                f"{self.message_bytes(sessions, n)} bytes unsplit: raise the client's "
                "max_message_bytes (and the server's --max-message-bytes)",
            )
        room = self.limit - m.ENVELOPE_BYTES  # for the rows
        tokens = min(n, (room - self.row_overhead) // max(1, self.token_bytes))
        tokens = math.ceil(n / math.ceil(n / tokens))  # even chunks, none larger
        rows = min(sessions, room // (tokens * self.token_bytes + self.row_overhead))
        rows = math.ceil(sessions / math.ceil(sessions / rows))  # even groups
        spans = [(t0, r0) for t0 in range(0, n, tokens) for r0 in range(0, sessions, rows)]
        return [
            BatchPart(i, slice(r0, min(sessions, r0 + rows)), slice(t0, min(n, t0 + tokens)))
            for i, (t0, r0) in enumerate(spans)
        ]

    def request(self, part: BatchPart) -> pb.AttendBatchRequest:
        """The AttendBatch message of ``part``, built when it is sent (a split prefill is
        never encoded all at once). A part's expected_lengths are the caller's plus the
        tokens the earlier chunks of the same sessions appended."""
        r, t = part.rows, part.tokens
        expected = None if self.expected is None else [e + t.start for e in self.expected[r]]
        return m.batch_request(
            self.ids[r], self.layer, self.q[r, t], self.k[r, t], self.v[r, t], expected
        )

    def put(self, part: BatchPart, result: Any) -> None:
        """Check a part's answer and place it."""
        r, t = part.rows, part.tokens
        rows, tokens = r.stop - r.start, t.stop - t.start
        if not isinstance(result, BatchResult):
            raise Q8KVError(
                grpc.StatusCode.INTERNAL,
                f"batch: expected the answer of a batch, got {type(result).__name__}",
            )
        want = [rows, tokens, *self.q.shape[2:]]
        if list(result.output.shape) != want or len(result.lengths) != rows:
            raise Q8KVError(
                grpc.StatusCode.INTERNAL,
                f"output.shape, lengths: expected {want} and {rows} lengths (one per "
                f"session), got {list(result.output.shape)} and {len(result.lengths)}",
            )
        if len(self.parts) == 1:
            self._whole = result
            return
        if self._output is None:
            self._output = np.empty(self.q.shape, result.output.dtype)
        self._output[r, t] = result.output
        self._lengths[r] = result.lengths  # a later chunk of the same sessions overwrites

    def result(self, with_lengths: bool) -> np.ndarray | BatchResult:
        whole = self._whole
        if whole is None:
            whole = BatchResult(self._output, self._lengths)
        return whole if with_lengths else whole.output

    def failed(self, part: BatchPart, error: Q8KVError) -> Q8KVError:
        """``error`` of ``part``, saying for a split call which part failed, with its rows'
        indices those of the caller's batch, and what had applied."""
        if len(self.parts) == 1:
            return error
        r, t, i = part.rows, part.tokens, part.index
        applied = "nothing applied" if i == 0 else f"parts 1-{i} applied"
        message = _ROW_FIELD.sub(
            lambda match: f"{match[1]}[{int(match[2]) + r.start}]", error.message
        )
        message = (
            f"attend_batch: part {i + 1} of {len(self.parts)} (sessions[{r.start}:{r.stop}], "
            f"tokens[{t.start}:{t.stop}]) of a call split to fit max_message_bytes "
            f"{self.limit} failed ({applied}, later parts not sent): {message}"
        )
        if isinstance(error, AlreadyApplied):
            return AlreadyApplied(message, error.lengths)
        return Q8KVError(error.code, message, error.request_id)

    def one_message(self) -> pb.AttendBatchRequest:
        """The whole batch as one message, or RESOURCE_EXHAUSTED naming the limit."""
        if len(self.parts) > 1:
            sessions, n = self.q.shape[:2]
            raise Q8KVError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch: expected at most max_message_bytes {self.limit} bytes in one "
                f"message, got {self.message_bytes(sessions, n)}; attend_batch splits it "
                f"into {len(self.parts)} messages",
            )
        return self.request(self.parts[0])


def _check_batch_shapes(ids: list[str], q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    """q [B, n, H, D], k and v [B, n, KVH, D], B = len(ids), in dtypes the wire carries:
    what cutting the batch needs (the server checks the rest against each session)."""
    for name, array in (("q", q), ("k", k), ("v", v)):
        try:
            wire_dtype(array.dtype)
        except TensorError as exc:
            raise invalid_argument(f"{name}.{exc}") from None
        if array.ndim != 4:
            raise invalid_argument(
                f"{name}.shape: expected 4 dimensions [B, n, heads, head_dim], got "
                f"{list(array.shape)}"
            )
    b, n, _, d = q.shape
    for name, array in (("k", k), ("v", v)):
        if array.shape[:2] != (b, n) or array.shape[3] != d or array.shape != k.shape:
            raise invalid_argument(
                f"{name}.shape: expected [{b}, {n}, num_kv_heads, {d}] (from q.shape and "
                f"k.shape), got {list(array.shape)}"
            )
    if b != len(ids):
        raise invalid_argument(
            f"q.shape[0]: expected {len(ids)} (one row per session), got {b}"
        )


def _check_distinct(ids: list[str]) -> None:
    """Each session once: a split call's parts could not tell a repeat (the server can)."""
    if len(set(ids)) == len(ids):
        return
    seen: dict[str, int] = {}
    for b, sid in enumerate(ids):
        if sid in seen:
            raise invalid_argument(
                f"sessions[{b}]: expected each session once, got {sid!r} again "
                f"(first at sessions[{seen[sid]}])"
            )
        seen[sid] = b


def _expected_lengths(expected: Iterable[int] | None, count: int) -> list[int] | None:
    if expected is None:
        return None
    values = [m.as_int(e, f"expected_lengths[{b}]") for b, e in enumerate(expected)]
    if len(values) != count:
        raise invalid_argument(
            f"expected_lengths: expected none or {count} (one per session), got {len(values)}"
        )
    return values
