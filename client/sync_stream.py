"""The blocking AppendAndAttendStream helper: Stream, opened by Client.stream().

A shell like sync.py: StreamCore (core.py) checks and builds each message and opens the
call; this module only writes (through a queue the call reads from) and reads, blocking.
AsyncStream (aio_stream.py) is its asyncio twin.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

from . import messages as m
from .core import StreamCore, outputs
from .errors import Q8KVError, rpc_errors
from .types import AttendResult, BatchResult

if TYPE_CHECKING:
    from .sync import Client

# Ends the queue of outgoing requests: the call then half-closes.
_END = object()


class Stream(StreamCore):
    """One AppendAndAttendStream: many AppendAndAttend messages over one HTTP/2 stream.

    ``send(items)`` returns a request id; ``recv(request_id=None)`` waits for that id's
    answer (default: the oldest outstanding one), keeping others that arrive first;
    ``attend(items)`` does both. ``send_batch(layer, sessions, q, k, v)`` sends one packed
    batch message (as Client.attend_batch; its recv gives the [B, n, H, D] output, or a
    BatchResult with ``with_lengths``); ``attend_batch`` sends and waits, split into
    several messages where one would exceed max_message_bytes. A failed message raises
    Q8KVError (with ``request_id``) for that message only; the stream stays open. Use
    from one thread at a time. The stream has no deadline (it lives as long as the decode
    loop); close() ends it.

    Items may carry ``expected_length`` (AppendItem). If the stream breaks (UNAVAILABLE,
    CANCELLED), its outstanding messages may or may not have applied: resend them on a new
    stream only if conditional; an ABORTED answer then means applied exactly when
    ``client.applied(items)`` says so.
    """

    def __init__(self, client: Client, session_id: str | None = None) -> None:
        super().__init__(client, session_id)
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def _outgoing(self) -> Iterator[pb.AppendAndAttendStreamRequest]:
        while (request := self._requests.get()) is not _END:
            yield request

    def send(self, items: Iterable[m.BatchItem]) -> int:
        return self._send(*self._build(items))

    def send_batch(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        expected_lengths: Iterable[int] | None = None,
    ) -> int:
        """Send one packed batch message (see Client.attend_batch); returns its request id.
        One that would exceed max_message_bytes is refused before sending
        (RESOURCE_EXHAUSTED): attend_batch splits it."""
        plan = self._batch_plan(layer, sessions, q, k, v, expected_lengths)
        return self._send(*self._build_batch(plan.one_message()))

    def attend_batch(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        expected_lengths: Iterable[int] | None = None,
        with_lengths: bool = False,
    ) -> np.ndarray | BatchResult:
        """Send a packed batch and wait for its answer, as Client.attend_batch: split into
        messages that fit max_message_bytes, each sent once the one before it answered
        (then not all or none across them; the same rules)."""
        plan = self._batch_plan(layer, sessions, q, k, v, expected_lengths)
        for part in plan.parts:
            try:
                request_id = self._send(*self._build_batch(plan.request(part)))
                plan.put(part, self.recv(request_id, with_lengths=True))
            except Q8KVError as exc:
                raise plan.failed(part, exc) from None
        return plan.result(with_lengths)

    def _send(self, request_id: int, request: pb.AppendAndAttendStreamRequest) -> int:
        if self._call is None:
            stub = self._client._stub
            self._call = stub.AppendAndAttendStream(self._outgoing(), **self._open_options(request))
        self._requests.put(request)
        self._book.sent(request_id)
        return request_id

    def recv(
        self, request_id: int | None = None, with_lengths: bool = False
    ) -> list[np.ndarray] | list[AttendResult] | np.ndarray | BatchResult:
        """The answer of ``request_id``: its outputs (list), or for a batch message its
        output array; (output, length) pairs or a BatchResult with ``with_lengths``."""
        wanted = self._book.wanted(request_id)
        while (results := self._book.take(wanted)) is None:
            response = self._read(wanted)
            self._book.arrived[int(response.request_id)] = response
        return outputs(results, with_lengths)

    def _read(self, wanted: int) -> pb.AppendAndAttendStreamResponse:
        """The next response; a broken or ended stream closes and raises."""
        try:
            with rpc_errors():
                return next(self._call)
        except StopIteration:
            self._closed = True
            raise self._ended(wanted) from None
        except Q8KVError:
            self._closed = True
            raise

    def attend(
        self, items: Iterable[m.BatchItem], with_lengths: bool = False
    ) -> list[np.ndarray] | list[AttendResult]:
        """Send one message and wait for its answer."""
        return self.recv(self.send(items), with_lengths)

    def close(self) -> None:
        """Half-close; wait for the server to end the stream, or cancel if answers are
        still outstanding (nobody would read them)."""
        if not self._closing():
            return
        self._requests.put(_END)
        if self._book.pending:
            self._call.cancel()
            return
        with contextlib.suppress(Q8KVError), rpc_errors():
            for _ in self._call:
                pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
