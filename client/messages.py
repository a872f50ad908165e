"""Request building and response decoding, shared by the sync and asyncio clients.

Everything here is pure (no I/O), so the unit tests cover it without a server.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

from .codec import TensorError, decode, encode
from .errors import Q8KVError, invalid_argument, status_code
from .types import AttendResult

# A batch item: (session handle or id, layer, q, k, v), or a ready AttendItem message.
BatchItem = tuple[Any, int, np.ndarray, np.ndarray, np.ndarray] | pb.AttendItem


def new_session_id() -> str:
    """A client-made id, so a session-affine router can route CreateSession by it."""
    return str(uuid.uuid4())


def session_id_of(session: Any, field: str = "session") -> str:
    """A handle (anything with a str ``.id``) or an id -> the id."""
    sid = session if isinstance(session, str) else getattr(session, "id", None)
    if not isinstance(sid, str) or not sid:
        raise invalid_argument(
            f"{field}: expected a session handle or a non-empty id, got {session!r}"
        )
    return sid


def as_int(value: Any, field: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise invalid_argument(f"{field}: expected an integer, got {value!r}") from None


def create_request(
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_len: int,
    session_id: str | None = None,
    ttl_seconds: float | None = None,
    softmax_scale: float | None = None,
) -> pb.CreateSessionRequest:
    geometry = pb.Geometry(
        num_layers=as_int(num_layers, "num_layers"),
        num_heads=as_int(num_heads, "num_heads"),
        num_kv_heads=as_int(num_kv_heads, "num_kv_heads"),
        head_dim=as_int(head_dim, "head_dim"),
        max_len=as_int(max_len, "max_len"),
    )
    request = pb.CreateSessionRequest(
        session_id=session_id or new_session_id(),
        geometry=geometry,
        ttl_seconds=float(ttl_seconds or 0.0),
    )
    if softmax_scale is not None:  # unset (not 0.0) lets the server use 1/sqrt(head_dim)
        request.softmax_scale = float(softmax_scale)
    return request


def _tensor(array: Any, field: str) -> pb.Tensor:
    """Encode in the array's own dtype; a dtype the wire lacks names the field."""
    try:
        return encode(array)
    except TensorError as exc:
        raise invalid_argument(f"{field}.{exc}") from None


def attend_item(session: Any, layer: int, q: Any, k: Any, v: Any, field: str = "") -> pb.AttendItem:
    """One (session, layer, q, k, v) -> AttendItem; q, k and v each keep their own dtype."""
    prefix = f"{field}." if field else ""
    return pb.AttendItem(
        session_id=session_id_of(session, prefix + "session"),
        layer=as_int(layer, prefix + "layer"),
        q=_tensor(q, prefix + "q"),
        k=_tensor(k, prefix + "k"),
        v=_tensor(v, prefix + "v"),
    )


def batch_items(items: Iterable[BatchItem]) -> list[pb.AttendItem]:
    """Normalise a batch: tuples of (handle or id, layer, q, k, v) or AttendItem messages."""
    out: list[pb.AttendItem] = []
    for i, item in enumerate(items):
        field = f"items[{i}]"
        if isinstance(item, pb.AttendItem):
            out.append(item)
            continue
        if isinstance(item, str | bytes) or not isinstance(item, Sequence) or len(item) != 5:
            raise invalid_argument(
                f"{field}: expected (session, layer, q, k, v), got {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, Sequence) else "")
            )
        out.append(attend_item(*item, field=field))
    return out


def decode_results(results: Sequence[pb.AttendResult]) -> list[AttendResult]:
    """Response results -> (output array, new length) pairs, in order."""
    decoded = []
    for i, result in enumerate(results):
        try:
            output = decode(result.output, f"results[{i}].output")
        except TensorError as exc:  # a server bug or a version skew: say exactly what
            raise Q8KVError(grpc.StatusCode.INTERNAL, str(exc)) from None
        decoded.append(AttendResult(output, int(result.length)))
    return decoded


def check_result_count(sent: int, received: int) -> None:
    if sent != received:
        raise Q8KVError(
            grpc.StatusCode.INTERNAL, f"results: expected {sent} (one per item), got {received}"
        )


def dequantize_request(
    session_id: str, layer: int, start: int = 0, end: int | None = None
) -> pb.DequantizeRequest:
    request = pb.DequantizeRequest(
        session_id=session_id, layer=as_int(layer, "layer"), start=as_int(start, "start")
    )
    if end is not None:
        request.end = as_int(end, "end")
    return request


def decode_dequantize(response: pb.DequantizeResponse) -> tuple[np.ndarray, np.ndarray]:
    try:
        return decode(response.k, "k"), decode(response.v, "v")
    except TensorError as exc:
        raise Q8KVError(grpc.StatusCode.INTERNAL, str(exc)) from None


# --- AppendAndAttendStream -------------------------------------------------------------


def stream_request(request_id: int, items: Iterable[BatchItem]) -> pb.AppendAndAttendStreamRequest:
    return pb.AppendAndAttendStreamRequest(request_id=request_id, items=batch_items(items))


def stream_results(response: pb.AppendAndAttendStreamResponse) -> list[AttendResult]:
    """One stream response -> its results, or Q8KVError (with request_id) if it failed."""
    if response.error_code != 0:
        raise Q8KVError(
            status_code(response.error_code),
            response.error_message or "stream message failed",
            request_id=int(response.request_id),
        )
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
        request_id = self._next_id
        request = stream_request(request_id, items)  # may raise: the id is not spent then
        self._next_id += 1
        return request_id, request

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

    def take(self, request_id: int) -> list[AttendResult] | None:
        """The results of ``request_id`` if its response has arrived (raises if it failed)."""
        response = self.arrived.pop(request_id, None)
        if response is None:
            return None
        self.pending.remove(request_id)
        return stream_results(response)


# --- ExportSession / ImportSession -----------------------------------------------------


def import_chunks(chunks: Iterable[pb.SessionChunk]) -> tuple[list[pb.SessionChunk], str | None]:
    """Chunks to send to ImportSession, checked for type, and the header's session id (for
    routing: the router must send the import where the id hashes to)."""
    out: list[pb.SessionChunk] = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, pb.SessionChunk):
            raise invalid_argument(
                f"chunks[{i}]: expected a SessionChunk, got {type(chunk).__name__}"
            )
        out.append(chunk)
    if not out:
        raise invalid_argument("chunks: expected a header, token chunks and a trailer, got none")
    first = out[0]
    session_id = first.header.session_id if first.WhichOneof("part") == "header" else None
    return out, session_id or None


def imported_session_id(response: pb.ImportSessionResponse) -> str:
    sid = response.session.session_id
    if not sid:
        raise Q8KVError(grpc.StatusCode.INTERNAL, "session.session_id: expected an id, got ''")
    return sid
