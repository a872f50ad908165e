"""Request messages in, response messages out: decode and check what no session could take
(item count, token count, tensor dtype/shape/values), and encode what the engine returns."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import grpc
import numpy as np

from q8kv import wire
from q8kv.v1 import kvcache_pb2 as pb

from ..engine import AppendRequest, Geometry, PackedBatch, SessionSnapshot
from ..errors import InvalidArgument


@dataclass(frozen=True)
class CallLimits:
    max_items: int = 1024
    max_tokens: int = 65536
    # The server's gRPC message limit (--max-message-bytes): ExportSession's chunks fit it.
    max_message_bytes: int = 512 * 1024 * 1024


# Largest |value| of q, k and v: attention then cannot overflow float32 (max 3.4e38). With
# head_dim <= 1024 and softmax_scale <= 1e3, a score is at most 1e3 * 1024 * (1e15)^2 ~ 1e36;
# Q8 keeps |dequantized k, v| <= max |k, v|, and the output, a convex combination of v, too.
MAX_ABS_VALUE = 1e15
# The output travels in q's dtype: float16 q needs |v| within float16's range (65504).
_OUTPUT_MAX = {np.dtype("<f2"): float(np.finfo(np.float16).max)}


def geometry_of(g: pb.Geometry) -> Geometry:
    return Geometry(g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.max_len)


def session_info(snap: SessionSnapshot, page_bytes: int) -> pb.SessionInfo:
    g = snap.geometry
    return pb.SessionInfo(
        session_id=snap.id,
        geometry=pb.Geometry(
            num_layers=g.num_layers,
            num_heads=g.num_heads,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            max_len=g.max_len,
        ),
        softmax_scale=snap.softmax_scale,
        layer_lengths=snap.layer_lengths,
        cache_bytes=snap.tokens * g.token_bytes(),
        reserved_bytes=snap.pages_held * page_bytes,
        ttl_seconds=snap.ttl_seconds,
        created_at=snap.created_at,
        last_used_at=snap.last_used_at,
    )


def decode_items(items, limits: CallLimits = CallLimits()) -> list[AppendRequest]:
    """Decode every item's tensors without copying; reject what no session could take."""
    if not items:
        raise InvalidArgument("items: expected at least 1 item, got 0")
    if len(items) > limits.max_items:
        raise InvalidArgument(
            f"items: expected at most {limits.max_items} items per call, got {len(items)}"
        )
    new_tokens = sum(item.k.shape[0] if item.k.shape else 0 for item in items)
    if new_tokens > limits.max_tokens:
        raise InvalidArgument(
            f"items: expected at most {limits.max_tokens} new tokens per call, got {new_tokens}"
        )
    return [_decode_item(f"items[{index}]", item) for index, item in enumerate(items)]


def decode_batch(request, limits: CallLimits = CallLimits()) -> PackedBatch:
    """An AttendBatchRequest, decoded without copying and checked as a whole: one pass over
    each tensor, however many sessions it carries."""
    ids = list(request.session_ids)
    count = len(ids)
    if not 1 <= count <= limits.max_items:
        raise InvalidArgument(
            f"session_ids: expected 1..{limits.max_items} sessions per call, got {count}"
        )
    if len(set(ids)) != count:
        seen: dict[str, int] = {}
        for b, sid in enumerate(ids):
            if sid in seen:
                raise InvalidArgument(
                    f"session_ids[{b}]: expected each session once, got {sid!r} again "
                    f"(first at session_ids[{seen[sid]}])"
                )
            seen[sid] = b
    if "" in ids:
        raise InvalidArgument(f"session_ids[{ids.index('')}]: expected a session id, got ''")
    q, k, v = (_decode_tensor(name, getattr(request, name), 4) for name in ("q", "k", "v"))
    b, n, _, d = q.shape
    for name, array in (("k", k), ("v", v)):
        if array.shape[:2] != (b, n) or array.shape[3] != d or array.shape[2] != k.shape[2]:
            raise InvalidArgument(
                f"{name}.shape: expected [{b}, {n}, num_kv_heads, {d}] (from q.shape and "
                f"k.shape), got {list(array.shape)}"
            )
    if b != count:
        raise InvalidArgument(
            f"q.shape[0]: expected {count} (one row per session id), got {b}"
        )
    if b * n > limits.max_tokens:
        raise InvalidArgument(
            f"q.shape: expected at most {limits.max_tokens} new tokens per call, got "
            f"{b} x {n} = {b * n}"
        )
    _check_tensors("", {"q": q, "k": k, "v": v})
    expected = list(request.expected_lengths) or None
    if expected is not None:
        if len(expected) != count:
            raise InvalidArgument(
                f"expected_lengths: expected none or {count} (one per session), got "
                f"{len(expected)}"
            )
        if min(expected) < 0:
            bad = next(i for i, e in enumerate(expected) if e < 0)
            raise InvalidArgument(
                f"expected_lengths[{bad}]: expected >= 0, got {expected[bad]}"
            )
    return PackedBatch(ids, request.layer, q, k, v, expected)


# Answers are serialized here, not built as messages: each output is copied once, into the
# response's bytes, where filling a message and serializing it copies it three times
# (wire.tensor_parts). The front door passes bytes through. Parts are joined by the caller.
Parts = wire.Parts


def attend_batch_response(output: np.ndarray, lengths: list[int]) -> Parts:
    """An AttendBatchResponse's serialization, in parts."""
    lengths_field = pb.AttendBatchResponse(lengths=lengths).SerializeToString()
    return [*wire.length_delimited(1, wire.tensor_parts(output)), lengths_field]


def dequantize_response(k: np.ndarray, v: np.ndarray, length: int) -> Parts:
    """A DequantizeResponse's serialization, in parts: float32 K and V, each copied once."""
    return [*wire.length_delimited(1, wire.tensor_parts(k)),
            *wire.length_delimited(2, wire.tensor_parts(v)),
            pb.DequantizeResponse(length=length).SerializeToString()]  # fmt: skip


def attend_response(requests: list[AppendRequest], results, field: int = 1) -> Parts:
    """Each item's result (output in its q's dtype, the layer's new length) as one
    AttendResult field ``field``: an AppendAndAttendResponse's serialization with the
    default (results = 1), the stream response's results with 2."""
    parts: Parts = []
    for request, (out, length) in zip(requests, results, strict=True):
        result = [*wire.length_delimited(1, wire.tensor_parts(out, request.q.dtype)),
                  pb.AttendResult(length=length).SerializeToString()]  # fmt: skip
        parts += wire.length_delimited(field, result)
    return parts


def stream_response(
    request_id: int, results: Parts | None = None, batch: Parts | None = None
) -> bytes:
    """An AppendAndAttendStreamResponse, serialized: its id, then the results (parts of
    field 2, from ``attend_response``) or the batch's answer (``attend_batch_response``)."""
    head = pb.AppendAndAttendStreamResponse(request_id=request_id).SerializeToString()
    if batch is not None:
        return b"".join([head, *wire.length_delimited(5, batch)])  # batch is field 5
    return b"".join([head, *(results or [])])


def _decode_item(prefix: str, item) -> AppendRequest:
    tensors = {
        name: _decode_tensor(f"{prefix}.{name}", getattr(item, name), 3)
        for name in ("q", "k", "v")
    }
    _check_tensors(f"{prefix}.", tensors)
    if not item.session_id:
        raise InvalidArgument(f"{prefix}.session_id: expected a session id, got ''")
    expected = item.expected_length if item.HasField("expected_length") else None
    if expected is not None and expected < 0:
        raise InvalidArgument(f"{prefix}.expected_length: expected >= 0, got {expected}")
    return AppendRequest(item.session_id, item.layer, **tensors, expected_length=expected)


_DIMENSIONS = {3: "[n, heads, head_dim]", 4: "[B, n, heads, head_dim]"}


def _decode_tensor(field: str, tensor, ndim: int) -> np.ndarray:
    try:
        array = wire.decode(tensor, field)
    except wire.TensorError as exc:
        raise InvalidArgument(str(exc)) from None
    if array.ndim != ndim:
        raise InvalidArgument(
            f"{field}.shape: expected {ndim} dimensions {_DIMENSIONS[ndim]}, "
            f"got {list(array.shape)}"
        )
    return array


# Up to this many values of q, k and v together, one pass checks all three (a decode step:
# 6k values; a pass per tensor costs three times the fixed cost of a numpy call chain).
_JOINT_CHECK_VALUES = 1 << 16


def _check_tensors(prefix: str, tensors: dict[str, np.ndarray]) -> None:
    """Every value of q, k and v finite and within the bound attention needs."""
    bounds = {name: (MAX_ABS_VALUE, "so attention cannot overflow float32") for name in tensors}
    if tensors["q"].dtype in _OUTPUT_MAX:
        bounds["v"] = _OUTPUT_MAX[tensors["q"].dtype], "the output travels in q's float16"
    arrays = list(tensors.values())
    if (
        sum(a.size for a in arrays) <= _JOINT_CHECK_VALUES
        and len({a.dtype for a in arrays}) == 1
    ):
        # Small tensors of one dtype: one pass over all of them. When it finds nothing out
        # of the tightest bound (NaN compares false), every tensor passes; else the pass
        # per tensor below names the one at fault.
        largest = wire.largest_magnitude(np.concatenate(arrays, axis=None))
        if largest <= min(bound for bound, _ in bounds.values()):
            return
    for name, array in tensors.items():
        _check_values(f"{prefix}{name}", array, *bounds[name])


def _check_values(field: str, array: np.ndarray, bound: float, why: str) -> None:
    """Finite and |x| <= bound, in one pass over the bits."""
    largest = wire.largest_magnitude(array)
    if not math.isfinite(largest):  # math: np.isfinite of a Python float costs ~1 us
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InvalidArgument(f"{field}: expected finite values, got {bad} NaN/Inf of {array.size}")
    if largest > bound:
        raise InvalidArgument(
            f"{field}: expected |values| <= {bound:g} ({why}), got a largest |value| of "
            f"{largest:g}"
        )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
