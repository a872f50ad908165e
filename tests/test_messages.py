"""Request decoding and its value checks (server/rpc/messages.py), in-process: small q, k, v
of one dtype are checked in one pass over all three, which must accept and refuse exactly
what the pass per tensor does, with the same message naming the same tensor."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from harness.tensors import random_tensor

from q8kv import wire
from q8kv.server.errors import InvalidArgument
from q8kv.server.rpc import messages
from q8kv.server.rpc.messages import MAX_ABS_VALUE, decode_batch, decode_items
from q8kv.v1 import kvcache_pb2 as pb

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
HEADS = {"q": 8, "k": 2, "v": 2}


def tensors(rng: np.random.Generator, dtypes: dict[str, type], n: int = 1) -> dict:
    return {name: random_tensor(rng, (n, HEADS[name], 64), dtypes[name]) for name in HEADS}


def item(arrays: dict) -> pb.AttendItem:
    return pb.AttendItem(session_id="s", layer=0, **{k: wire.encode(a) for k, a in arrays.items()})


def per_tensor_verdict(arrays: dict) -> str | None:
    """The pass per tensor alone: the message of the first tensor it refuses, or None."""
    bounds = {name: (MAX_ABS_VALUE, "so attention cannot overflow float32") for name in HEADS}
    if arrays["q"].dtype == np.float16:
        bounds["v"] = (65504.0, "the output travels in q's float16")
    try:
        for name in HEADS:
            messages._check_values(f"items[0].{name}", arrays[name], *bounds[name])
    except InvalidArgument as exc:
        return exc.message
    return None


def spoil(rng: np.random.Generator, arrays: dict) -> None:
    """One value of one random tensor made NaN, infinite or too large for its bound."""
    name = str(rng.choice(list(HEADS)))
    a = arrays[name]
    flat = a.reshape(-1)
    big = {np.float16: 65504.0, np.float32: 3e15, ml_dtypes.bfloat16: 2e15}[a.dtype.type]
    flat[int(rng.integers(flat.size))] = rng.choice([np.nan, -np.inf, np.inf, big, -big])


@pytest.mark.parametrize("seed", range(40))
def test_one_pass_check_agrees_with_the_pass_per_tensor(seed: int) -> None:
    """Random dtypes (mostly one for all three), random faults: decode_items refuses with
    the per-tensor message, or accepts, exactly when the per-tensor pass does."""
    rng = np.random.default_rng(seed)
    one = DTYPES[seed % 3]
    dtypes = {name: one if seed % 4 else DTYPES[rng.integers(3)] for name in HEADS}
    arrays = tensors(rng, dtypes, n=int(rng.integers(1, 4)))
    if seed % 5:
        spoil(rng, arrays)
    want = per_tensor_verdict(arrays)
    if want is None:
        (request,) = decode_items([item(arrays)])
        for name in HEADS:
            np.testing.assert_array_equal(getattr(request, name), arrays[name])
    else:
        with pytest.raises(InvalidArgument) as err:
            decode_items([item(arrays)])
        assert err.value.message == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", ["q", "k", "v"])
def test_a_fault_in_one_tensor_is_named(dtype, bad: str) -> None:
    rng = np.random.default_rng(3)
    arrays = tensors(rng, dict.fromkeys(HEADS, dtype))
    arrays[bad].reshape(-1)[5] = np.inf
    with pytest.raises(InvalidArgument) as err:
        decode_items([item(arrays)])
    size = arrays[bad].size
    assert err.value.message == f"items[0].{bad}: expected finite values, got 1 NaN/Inf of {size}"


def test_bound_of_v_under_float16_q_holds_in_the_one_pass() -> None:
    """float32 q, k, v share a dtype: a v of 1e5 passes (bound 1e15); with a float16 q the
    dtypes differ and the v bound is float16's 65504."""
    rng = np.random.default_rng(4)
    arrays = tensors(rng, dict.fromkeys(HEADS, np.float32))
    arrays["v"].reshape(-1)[0] = 1e5
    decode_items([item(arrays)])
    arrays["q"] = arrays["q"].astype(np.float16)
    with pytest.raises(InvalidArgument, match=r"items\[0\]\.v: expected \|values\| <= 65504"):
        decode_items([item(arrays)])


def test_packed_batch_is_checked_the_same_way() -> None:
    rng = np.random.default_rng(5)
    q, k, v = (random_tensor(rng, (2, 1, h, 64), np.float16) for h in (8, 2, 2))
    k[1, 0, 1, 7] = np.nan

    def request(k: np.ndarray) -> pb.AttendBatchRequest:
        return pb.AttendBatchRequest(
            session_ids=["a", "b"], layer=0, q=wire.encode(q), k=wire.encode(k), v=wire.encode(v)
        )

    with pytest.raises(InvalidArgument, match=r"^k: expected finite values, got 1 NaN/Inf"):
        decode_batch(request(k))
    k[1, 0, 1, 7] = 1.0
    np.testing.assert_array_equal(decode_batch(request(k)).k, k)


# --- answers serialized by hand: the bytes protobuf writes, each output copied once -------

DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_answers_are_the_bytes_protobuf_writes(dtype) -> None:
    """Every answer the service serializes itself equals the same message built and
    serialized by protobuf, byte for byte: unary and stream, items and batch, empty
    outputs, lengths past one varint byte, outputs larger than 16 KiB (3-byte lengths)."""
    rng = np.random.default_rng(31)
    for n in (0, 1, 3, 40):
        outs = [random_tensor(rng, (n, 4, 64), dtype) for _ in range(3)]
        lengths = [int(x) for x in rng.integers(0, 1 << 40, 3)]
        requests = [messages.AppendRequest("s", 0, out, out[:, :2], out[:, :2]) for out in outs]
        results = list(zip(outs, lengths, strict=True))
        built = pb.AppendAndAttendResponse()
        for out, length in results:
            built.results.add(output=wire.encode(out), length=length)
        ours = b"".join(messages.attend_response(requests, results))
        assert ours == built.SerializeToString()

        stream = pb.AppendAndAttendStreamResponse(request_id=2**63 + 5)
        stream.results.extend(built.results)
        ours = messages.stream_response(2**63 + 5, messages.attend_response(requests, results, 2))
        assert ours == stream.SerializeToString()

        batch = np.stack(outs)  # [B, n, H, D]
        built_batch = pb.AttendBatchResponse(output=wire.encode(batch), lengths=lengths)
        ours = b"".join(messages.attend_batch_response(batch, lengths))
        assert ours == built_batch.SerializeToString()
        stream = pb.AppendAndAttendStreamResponse(request_id=7, batch=built_batch)
        ours = messages.stream_response(7, batch=messages.attend_batch_response(batch, lengths))
        assert ours == stream.SerializeToString()
        assert pb.AppendAndAttendStreamResponse.FromString(ours) == stream


@pytest.mark.parametrize("tokens", [0, 1, 300])
def test_a_dequantize_answer_is_the_bytes_protobuf_writes(tokens) -> None:
    """K and V float32 [KVH, tokens, D] (none: a range of no tokens) and a length past one
    varint byte, byte for byte protobuf's own serialization."""
    rng = np.random.default_rng(tokens)
    k, v = (rng.standard_normal((2, tokens, 64)).astype(np.float32) for _ in range(2))
    built = pb.DequantizeResponse(k=wire.encode(k), v=wire.encode(v), length=70_000 + tokens)
    assert b"".join(messages.dequantize_response(k, v, 70_000 + tokens)) == (
        built.SerializeToString()
    )


def test_an_answer_in_another_dtype_than_the_array_is_cast() -> None:
    """An item's output goes back in its q's dtype, whatever the backend's array holds."""
    rng = np.random.default_rng(5)
    out = rng.standard_normal((2, 4, 64)).astype(np.float32)
    q = out.astype(np.float16)
    request = messages.AppendRequest("s", 0, q, q[:, :2], q[:, :2])
    ours = pb.AppendAndAttendResponse.FromString(
        b"".join(messages.attend_response([request], [(out, 9)]))
    )
    (result,) = ours.results
    np.testing.assert_array_equal(wire.decode(result.output), out.astype(np.float16))
    assert result.output.dtype == pb.FLOAT16 and result.length == 9
