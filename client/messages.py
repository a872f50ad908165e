"""Request building and response decoding, shared by the sync and asyncio clients.

Everything here is pure (no I/O), so the unit tests cover it without a server. The
stream's messages are in stream_messages.py, packed batches in batching.py.
"""

from __future__ import annotations

import hashlib
import operator
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import numpy as np

from q8kv.v1 import kvcache_pb2 as pb
from q8kv.wire import TensorError, decode, fill

from .errors import AlreadyApplied, Q8KVError, invalid_argument
from .types import AppendItem, AttendResult, BatchResult, SessionInfo

# A batch item: (session handle or id, layer, q, k, v), the same with expected_length last
# (AppendItem), or a ready AttendItem message.
BatchItem = tuple[Any, int, np.ndarray, np.ndarray, np.ndarray] | AppendItem | pb.AttendItem
_ITEM_SHAPE = "(session, layer, q, k, v) or (session, layer, q, k, v, expected_length)"


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


def _tensor(array: Any, field: str, into: pb.Tensor) -> None:
    """Encode in the array's own dtype into a message's Tensor field (in place: a Tensor
    passed to a constructor is copied once more); a dtype the wire lacks names the field."""
    try:
        fill(into, array)
    except TensorError as exc:
        raise invalid_argument(f"{field}.{exc}") from None


def attend_item(
    session: Any,
    layer: int,
    q: Any,
    k: Any,
    v: Any,
    field: str = "",
    expected_length: int | None = None,
    into: pb.AttendItem | None = None,
) -> pb.AttendItem:
    """One (session, layer, q, k, v) -> AttendItem (``into``: an item of the request being
    built, filled in place); q, k and v each keep their own dtype. ``expected_length``
    (None: unconditional) makes the append conditional."""
    prefix = f"{field}." if field else ""
    item = pb.AttendItem() if into is None else into
    item.session_id = session_id_of(session, prefix + "session")
    item.layer = as_int(layer, prefix + "layer")
    for name, array in (("q", q), ("k", k), ("v", v)):
        _tensor(array, prefix + name, getattr(item, name))
    if expected_length is not None:
        item.expected_length = as_int(expected_length, prefix + "expected_length")
    return item


def batch_items(items: Iterable[BatchItem], into=None) -> Sequence[pb.AttendItem]:
    """Normalise a batch: tuples of (handle or id, layer, q, k, v[, expected_length]),
    AppendItems or AttendItem messages. ``into``: a request's repeated items, built in
    place (a message passed to a constructor is copied once more: large for a prefill)."""
    out = [] if into is None else into
    for i, item in enumerate(items):
        field = f"items[{i}]"
        if isinstance(item, pb.AttendItem):
            if into is None:
                out.append(item)
            else:
                into.add().CopyFrom(item)
            continue
        shaped = isinstance(item, Sequence) and not isinstance(item, str | bytes)
        if not shaped or len(item) not in (5, 6):
            raise invalid_argument(
                f"{field}: expected {_ITEM_SHAPE}, got {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, Sequence) else "")
            )
        session, layer, q, k, v, *expected = item
        if into is None:
            out.append(attend_item(session, layer, q, k, v, field, *expected))
        else:
            attend_item(session, layer, q, k, v, field, *expected, into=into.add())
    return out


def batch_request(
    session_ids: Sequence[str],
    layer: int,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    expected_lengths: Sequence[int] | None = None,
) -> pb.AttendBatchRequest:
    """One AttendBatch message: q [B, n, H, D], k/v [B, n, KVH, D] as one tensor each, in
    their own dtypes; ``expected_lengths`` [B] or None (unconditional)."""
    request = pb.AttendBatchRequest(
        session_ids=session_ids, layer=layer, expected_lengths=expected_lengths or ()
    )
    for name, array in (("q", q), ("k", k), ("v", v)):
        _tensor(array, name, getattr(request, name))  # in place: no copy of a copy
    return request


def decode_batch_response(response: pb.AttendBatchResponse, field: str = "") -> BatchResult:
    """An AttendBatchResponse -> (output [B, n, H, D], lengths [B])."""
    try:
        output = decode(response.output, f"{field}output")
    except TensorError as exc:  # a server bug or a version skew: say exactly what
        raise Q8KVError(grpc.StatusCode.INTERNAL, str(exc)) from None
    return BatchResult(output, [int(n) for n in response.lengths])


# --- conditional appends: safe retries ---------------------------------------------------

# Failures after which the call may or may not have applied (a drained server's job still
# ran; the answer was lost): only a conditional append may be sent again.
AMBIGUOUS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
RETRY_DELAY = 0.05  # seconds before the first retry, doubled each time, at most 1 s


def require_conditional(items: Sequence[pb.AttendItem], why: str) -> None:
    for i, item in enumerate(items):
        if not item.HasField("expected_length"):
            raise invalid_argument(f"items[{i}].expected_length: expected one {why}, got none")


def check_retries(items: Sequence[pb.AttendItem], retries: int) -> None:
    """Retries need every item conditional: an unconditional one could append twice."""
    retries = as_int(retries, "retries")
    if retries < 0:
        raise invalid_argument(f"retries: expected >= 0, got {retries}")
    if retries:
        why = f"with retries={retries} (a retry without it may append the tokens twice)"
        require_conditional(items, why)


def retry_delay(attempt: int) -> float:
    return min(1.0, RETRY_DELAY * 2**attempt)


def applied_lengths(items: Sequence[pb.AttendItem]) -> dict[tuple[str, int], int]:
    """The length of each (session id, layer) the conditional items touch once the call
    applied: the last item on a layer's expected_length + its tokens."""
    lengths = {}
    for item in items:
        n = item.k.shape[0] if item.k.shape else 0
        lengths[(item.session_id, item.layer)] = item.expected_length + n
    return lengths


def length_of(info: SessionInfo, layer: int) -> int:
    """A layer's length, or -1 for a layer the session lacks (then nothing was applied)."""
    return info.layer_lengths[layer] if 0 <= layer < len(info.layer_lengths) else -1


def already_applied(
    items: Sequence[pb.AttendItem], current: dict[tuple[str, int], int], cause: Q8KVError
) -> Q8KVError:
    """What a retry's ABORTED means: AlreadyApplied when every layer is where the call would
    have put it (an earlier attempt applied; this assumes one writer per layer, which is
    what expected_length is for), else the ABORTED itself (someone else moved the layer)."""
    if current != applied_lengths(items):
        return cause
    shown = ", ".join(f"{sid!r} layer {layer}: {n}" for (sid, layer), n in current.items())
    return AlreadyApplied(
        f"items: an earlier attempt applied (lengths now {shown}); its outputs were lost",
        current,
    )


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


# Room in a message for what is not codes or scales (tags, lengths, varints): generous.
ENVELOPE_BYTES = 1024


def fit_chunks(chunks: list[pb.SessionChunk], max_message_bytes: int) -> list[pb.SessionChunk]:
    """``chunks`` with every token chunk within ``max_message_bytes`` (the receiving
    server's limit): larger ones are split by tokens and the trailer recomputed, after
    checking the one they came with, so damage on the way here is still refused. Chunks
    that already fit, or a stream too malformed to split, go as they are (the server then
    judges them)."""
    if all(c.ByteSize() + ENVELOPE_BYTES <= max_message_bytes for c in chunks):
        return chunks
    parts = [c.WhichOneof("part") for c in chunks]
    if len(parts) < 2 or (parts[0], parts[-1]) != ("header", "trailer"):
        return chunks
    if any(part != "tokens" for part in parts[1:-1]):
        return chunks
    digest = hashlib.sha256()
    for chunk in chunks[:-1]:
        digest.update(chunk.SerializeToString(deterministic=True))
    if digest.digest() != chunks[-1].trailer.sha256:
        raise invalid_argument("trailer.sha256: checksum mismatch, data corrupted")
    g = chunks[0].header.geometry
    out = [chunks[0]]
    for chunk in chunks[1:-1]:
        out.extend(_split_tokens(chunk.tokens, g, max_message_bytes))
    digest = hashlib.sha256()
    for chunk in out:
        digest.update(chunk.SerializeToString(deterministic=True))
    return [*out, pb.SessionChunk(trailer=pb.SessionTrailer(sha256=digest.digest()))]


def _split_tokens(
    tokens: pb.TokenChunk, g: pb.Geometry, max_message_bytes: int
) -> list[pb.SessionChunk]:
    """One TokenChunk as pieces of at most as many tokens as fit a message."""
    kvh, dim, count = g.num_kv_heads, g.head_dim, tokens.count
    code_bytes = 2 * kvh * dim * count
    sane = kvh > 0 and dim > 0 and dim % 32 == 0 and count > 0
    if not sane or (len(tokens.codes), len(tokens.scales)) != (code_bytes, code_bytes // 8):
        return [pb.SessionChunk(tokens=tokens)]  # malformed: the server judges it
    step = max(1, (max_message_bytes - ENVELOPE_BYTES) // (2 * kvh * dim * 9 // 8))
    codes = np.frombuffer(tokens.codes, np.int8).reshape(2, kvh, count, dim)
    scales = np.frombuffer(tokens.scales, "<f4").reshape(2, kvh, count, dim // 32)
    pieces = []
    for start in range(0, count, step):
        end = min(count, start + step)
        piece = pb.TokenChunk(
            layer=tokens.layer,
            start=tokens.start + start,
            count=end - start,
            codes=np.ascontiguousarray(codes[:, :, start:end]).tobytes(),
            scales=np.ascontiguousarray(scales[:, :, start:end]).tobytes(),
        )
        pieces.append(pb.SessionChunk(tokens=piece))
    return pieces


def imported_session_id(response: pb.ImportSessionResponse) -> str:
    sid = response.session.session_id
    if not sid:
        raise Q8KVError(grpc.StatusCode.INTERNAL, "session.session_id: expected an id, got ''")
    return sid
