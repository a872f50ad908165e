"""AppendAndAttendStream messages: each request built with its request id, each response
decoded, and the book that matches answers to requests by id.

Pure (no I/O), like messages.py, whose item and batch building it uses; the streams
(sync_stream.py, aio_stream.py) do the sending and reading.
"""

from __future__ import annotations

from collections.abc import Iterable

from q8kv.v1 import kvcache_pb2 as pb

from .errors import Q8KVError, invalid_argument, status_code
from .messages import BatchItem, batch_items, decode_batch_response, decode_results
from .types import AttendResult, BatchResult


def stream_request(request_id: int, items: Iterable[BatchItem]) -> pb.AppendAndAttendStreamRequest:
    request = pb.AppendAndAttendStreamRequest(request_id=request_id)
    batch_items(items, request.items)
    return request


def stream_results(
    response: pb.AppendAndAttendStreamResponse,
) -> list[AttendResult] | BatchResult:
    """One stream response -> its results (a BatchResult for a batch message), or
    Q8KVError (with request_id) if it failed."""
    if response.error_code != 0:
        raise Q8KVError(
            status_code(response.error_code),
            response.error_message or "stream message failed",
            request_id=int(response.request_id),
        )
    if response.HasField("batch"):
        return decode_batch_response(response.batch, "batch.")
    return decode_results(response.results)


class StreamBook:
    """Request ids and responses that arrived before anyone asked for them.

    Responses are matched to requests by ``request_id``, so a caller may send several
    messages before reading, and read them in any order.
    """

    def __init__(self) -> None:
        self._next_id = 1
        self.pending: list[int] = []  # sent, not yet returned, in send order
        self.arrived: dict[int, pb.AppendAndAttendStreamResponse] = {}

    def build(self, items: Iterable[BatchItem]) -> tuple[int, pb.AppendAndAttendStreamRequest]:
        """The next request id and its message; raising (bad or no items) spends no id."""
        request_id = self._next_id
        request = stream_request(request_id, items)
        if not request.items:
            raise invalid_argument("items: expected at least one item")
        self._next_id += 1
        return request_id, request

    def build_batch(
        self, batch: pb.AttendBatchRequest
    ) -> tuple[int, pb.AppendAndAttendStreamRequest]:
        """The next request id and a message carrying ``batch`` (AttendBatch on the stream)."""
        request_id = self._next_id
        self._next_id += 1
        return request_id, pb.AppendAndAttendStreamRequest(request_id=request_id, batch=batch)

    def sent(self, request_id: int) -> None:
        self.pending.append(request_id)

    def wanted(self, request_id: int | None) -> int:
        """The id a recv() waits for: the one given, else the oldest outstanding."""
        if request_id is None:
            if not self.pending:
                raise invalid_argument("recv: no request outstanding on this stream")
            return self.pending[0]
        if request_id not in self.pending:
            raise invalid_argument(f"request_id: {request_id} is not outstanding")
        return request_id

    def forget(self, request_id: int) -> None:
        """No answer will be taken for ``request_id`` (its write failed, or it was read)."""
        if request_id in self.pending:
            self.pending.remove(request_id)
        self.arrived.pop(request_id, None)

    def take(self, request_id: int) -> list[AttendResult] | BatchResult | None:
        """The results of ``request_id`` if its response has arrived (raises if it failed)."""
        response = self.arrived.pop(request_id, None)
        if response is None:
            return None
        self.pending.remove(request_id)
        return stream_results(response)
