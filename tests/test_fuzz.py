"""Bad input never takes the server down: structured garbage (hypothesis) on every RPC and
raw random bytes on every method. Only documented status codes come back, the server stays
up and logs no unexpected exception, and a session made before the fuzzing dequantizes bit
for bit the same afterwards. Bounded: about 10 s on 2 cores."""

from __future__ import annotations

import hashlib
import math
import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness.geometry import GEOM
from harness.rpc import bearer, method_path, stub
from harness.server import ServerProcess
from harness.sessions import caches, fill
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q8kv.client import Client
from q8kv.v1 import kvcache_pb2 as pb

TOKEN = "fuzz-token-0123456789"
KEEPER = f"keeper-{uuid.uuid4().hex}"
TARGET = "fuzz-target"  # a live session the fuzzer may change (deeper paths than unknown ids)
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
MAX_MESSAGE = 1 << 20
FUZZ = settings(
    max_examples=400, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 2, 31, 32, 33, 64, 127, 4096, 2**31 - 1, 2**31, 2**32,
                     2**62, 2**63 - 1, -(2**63), -(2**31)]),
    st.integers(-(2**63), 2**63 - 1),
)
INT32 = st.one_of(st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31)]),
                  st.integers(-(2**31), 2**31 - 1))
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38,
                                    -1.0, 1e300]), st.floats(allow_nan=True))
SESSION_IDS = st.one_of(
    st.sampled_from(["", TARGET, "unknown", "a" * 129, "../../etc/passwd", "x\x00y", "é",
                     str(uuid.UUID(int=0))]),
    st.text(max_size=140),
).filter(lambda s: s != KEEPER)
# Values a proto float field takes (NaN/Inf included; finite ones within float32's range).
FLOAT32S = FLOATS.map(lambda f: f if not math.isfinite(f) or abs(f) < 3e38 else -1.0)
DTYPES = st.one_of(st.sampled_from([0, 1, 2, 3, 4, -1, 2**31 - 1, -(2**31)]), INT32)


@st.composite
def tensors(draw):
    """Valid-looking tensors (maybe NaN/Inf, maybe mis-shaped) or garbage fields."""
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(1, 8, 64), (1, 2, 64), (3, 8, 64), (3, 2, 64),
                                      (0, 8, 64), (1, 8, 32), (2, 2, 64, 1), (64,)]))
        dtype = draw(st.sampled_from(["<f4", "<f2"]))
        values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape)
        bad = draw(st.sampled_from([None, math.nan, math.inf, -math.inf, 1e30]))
        if bad is not None and values.size:
            values.flat[draw(st.integers(0, values.size - 1))] = bad
        with np.errstate(over="ignore"):  # 1e30 as float16 is Inf: one more bad value
            array = values.astype(dtype)
        code = pb.FLOAT32 if dtype == "<f4" else pb.FLOAT16
        data = array.tobytes()
        if draw(st.booleans()):  # a byte length that does not match the shape
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))] + draw(
                st.binary(max_size=8)
            )
        return pb.Tensor(dtype=code, shape=list(shape), data=data)
    return pb.Tensor(
        dtype=draw(DTYPES),
        shape=draw(st.lists(INT64, max_size=6)),
        data=draw(st.binary(max_size=256)),
    )


ITEMS = st.builds(
    pb.AttendItem, session_id=SESSION_IDS, layer=INT64, q=tensors(), k=tensors(), v=tensors()
)
GEOMETRIES = st.one_of(
    st.builds(pb.Geometry, num_layers=INT64, num_heads=INT64, num_kv_heads=INT64,
              head_dim=INT64, max_len=INT64),
    st.builds(pb.Geometry, num_layers=st.integers(1, 3), num_heads=st.sampled_from([1, 8]),
              num_kv_heads=st.sampled_from([1, 2, 8]), head_dim=st.sampled_from([32, 64]),
              max_len=st.sampled_from([1, 16, 1 << 24])),
)


@st.composite
def chunk_streams(draw):
    """ImportSession input: shuffled, partial or garbage chunks, sometimes with a correct
    checksum over garbage (so the checks behind the checksum run too)."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["header", "tokens", "trailer", "empty"]))
        if kind == "header":
            parts.append(pb.SessionChunk(header=pb.SessionHeader(
                format_version=draw(st.sampled_from([1, 1, 0, 2, 2**32 - 1])),
                session_id=draw(SESSION_IDS),
                geometry=draw(GEOMETRIES),
                softmax_scale=draw(FLOAT32S),
                ttl_seconds=draw(FLOATS),
                layer_lengths=draw(st.lists(st.one_of(st.integers(0, 4), INT64), max_size=4)),
                tenant=draw(st.text(max_size=8)),
            )))
        elif kind == "tokens":
            count = draw(st.one_of(st.integers(0, 3), INT64))
            size = 2 * 2 * 64 * count if 0 < count <= 3 else draw(st.integers(0, 64))
            parts.append(pb.SessionChunk(tokens=pb.TokenChunk(
                layer=draw(st.one_of(st.integers(0, 3), INT64)),
                start=draw(st.one_of(st.integers(0, 3), INT64)), count=count,
                codes=bytes(draw(st.binary(min_size=size, max_size=size))),
                scales=draw(st.sampled_from([
                    b"", np.full(max(0, size // 32), 0.5, "<f4").tobytes(),
                    np.full(max(0, size // 32), np.nan, "<f4").tobytes(),
                    np.full(max(0, size // 32), -1.0, "<f4").tobytes(),
                ])),
            )))
        elif kind == "trailer":
            parts.append(pb.SessionChunk(trailer=pb.SessionTrailer(
                sha256=draw(st.binary(max_size=40)))))
        else:
            parts.append(pb.SessionChunk())
    if draw(st.booleans()):  # a matching trailer over whatever came before
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part.SerializeToString(deterministic=True))
        parts.append(pb.SessionChunk(trailer=pb.SessionTrailer(sha256=digest.digest())))
    return parts


@pytest.fixture(scope="module")
def fuzzed():
    """A server, a keeper session with data (never named by the fuzzer) and a channel."""
    srv = ServerProcess("--max-message-bytes", str(MAX_MESSAGE), "--max-sessions", "512",
                        env={"Q8KV_AUTH_TOKENS": f"{TOKEN} fuzzer"})
    with Client(srv.address, token=TOKEN) as c:
        keeper = c.create_session(**GEOM, session_id=KEEPER)
        fill(keeper, np.random.default_rng(0), [7, 33, 1])
        before = caches(keeper, 3), keeper.info().layer_lengths
        fill(c.create_session(**GEOM, session_id=TARGET), np.random.default_rng(1), [3, 0, 0])
    channel = grpc.insecure_channel(
        srv.address,
        options=[("grpc.max_send_message_length", 8 * MAX_MESSAGE),
                 ("grpc.max_receive_message_length", 8 * MAX_MESSAGE)],
    )
    yield srv, stub(channel), channel, before
    channel.close()
    srv.stop()


METADATA = st.sampled_from([bearer(TOKEN)] * 6 + [(), bearer("wrong-token-123")])


def outcome(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            for response in result:  # a stream: every message's own error code counts too
                code = getattr(response, "error_code", 0)
                assert code in {c.value[0] for c in DOCUMENTED}, response
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
        return exc.code()


def call_of(s, name, request, metadata):
    method = getattr(s, name)
    if name in ("AppendAndAttendStream", "ImportSession"):
        return lambda: method(iter(request), metadata=metadata, timeout=10)
    return lambda: method(request, metadata=metadata, timeout=10)


REQUESTS = st.one_of(
    st.tuples(st.just("CreateSession"), st.builds(
        lambda sid, g, ttl, scale: pb.CreateSessionRequest(
            session_id=sid, geometry=g, ttl_seconds=ttl,
            **({} if scale is None else {"softmax_scale": scale})),
        SESSION_IDS, GEOMETRIES, FLOATS,
        st.one_of(st.none(), FLOAT32S))),
    st.tuples(st.just("GetSession"), st.builds(pb.GetSessionRequest, session_id=SESSION_IDS)),
    st.tuples(st.just("ListSessions"), st.builds(
        pb.ListSessionsRequest, page_size=INT32, page_token=st.text(max_size=40))),
    st.tuples(st.just("DeleteSession"),
              st.builds(pb.DeleteSessionRequest, session_id=SESSION_IDS)),
    st.tuples(st.just("TruncateSession"), st.builds(
        pb.TruncateSessionRequest, session_id=SESSION_IDS, length=INT64)),
    st.tuples(st.just("AppendAndAttend"), st.builds(
        pb.AppendAndAttendRequest, items=st.lists(ITEMS, max_size=3))),
    st.tuples(st.just("AppendAndAttendStream"), st.lists(st.builds(
        pb.AppendAndAttendStreamRequest, request_id=st.integers(0, 2**64 - 1),
        items=st.lists(ITEMS, max_size=2)), max_size=3)),
    st.tuples(st.just("Dequantize"), st.builds(
        lambda sid, layer, start, end: pb.DequantizeRequest(
            session_id=sid, layer=layer, start=start, **({} if end is None else {"end": end})),
        SESSION_IDS, INT64, INT64, st.one_of(st.none(), INT64))),
    st.tuples(st.just("ExportSession"),
              st.builds(pb.ExportSessionRequest, session_id=SESSION_IDS)),
    st.tuples(st.just("ImportSession"), chunk_streams()),
)


@settings(FUZZ, max_examples=1500)
@given(call=REQUESTS, metadata=METADATA)
def test_structured_garbage_on_every_rpc(fuzzed, call, metadata):
    _, s, _, _ = fuzzed
    name, request = call
    code = outcome(call_of(s, name, request, metadata))
    if metadata != bearer(TOKEN):
        assert code == grpc.StatusCode.UNAUTHENTICATED


RAW_KINDS = {
    "CreateSession": "unary_unary", "GetSession": "unary_unary",
    "ListSessions": "unary_unary", "DeleteSession": "unary_unary",
    "TruncateSession": "unary_unary", "AppendAndAttend": "unary_unary",
    "AppendAndAttendStream": "stream_stream", "Dequantize": "unary_unary",
    "ExportSession": "unary_stream", "ImportSession": "stream_unary",
}


@settings(FUZZ, max_examples=600)
@given(name=st.sampled_from(sorted(RAW_KINDS)),
       payloads=st.lists(st.one_of(st.binary(max_size=300),
                                   st.sampled_from([b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f",
                                                    b"\x12\x05\xff\xfe\xfd\xfc\xfb"])),
                         min_size=1, max_size=3))
def test_raw_random_bytes_on_every_method(fuzzed, name, payloads):
    _, _, channel, _ = fuzzed
    kind = RAW_KINDS[name]
    multi = getattr(channel, kind)(method_path(name))  # no (de)serializers: bytes in and out
    arg = iter(payloads) if kind.startswith("stream") else payloads[0]
    try:
        result = multi(arg, metadata=bearer(TOKEN), timeout=10)
        if kind.endswith("stream"):
            list(result)
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, (name, exc.code(), exc.details())


def test_oversized_and_huge_inputs(fuzzed):
    srv, s, _, _ = fuzzed
    md = bearer(TOKEN)
    big = pb.Tensor(dtype=pb.FLOAT32, shape=[1, 8, MAX_MESSAGE // 32],
                    data=bytes(MAX_MESSAGE + 4096))
    item = pb.AttendItem(session_id=TARGET, layer=0, q=big, k=big, v=big)
    with pytest.raises(grpc.RpcError) as err:
        s.AppendAndAttend(pb.AppendAndAttendRequest(items=[item]), metadata=md, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Zero and huge dimensions together: no bytes, but no array of that shape either.
    for shape in ([0, 2**62, 2**62], [0, 2**63 - 1], [0] * 65, [2**32, 2**32]):
        t = pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b"")
        item = pb.AttendItem(session_id=TARGET, layer=0, q=t, k=t, v=t)
        with pytest.raises(grpc.RpcError) as err:
            s.AppendAndAttend(pb.AppendAndAttendRequest(items=[item]), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, err.value.details())
    # A long id and thousands of items.
    with pytest.raises(grpc.RpcError) as err:
        s.GetSession(pb.GetSessionRequest(session_id="x" * 100_000), metadata=md, timeout=10)
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    tiny = pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=bytes(4))
    items = [pb.AttendItem(session_id=TARGET, q=tiny, k=tiny, v=tiny)] * 5000
    with pytest.raises(grpc.RpcError) as err:
        s.AppendAndAttend(pb.AppendAndAttendRequest(items=items), metadata=md, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1024 items" in err.value.details()


def test_zz_server_survived_and_the_keeper_is_unchanged(fuzzed):
    """Runs last in this module (tests run in file order)."""
    srv, _, channel, before = fuzzed
    assert srv.proc.poll() is None
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    with Client(srv.address, token=TOKEN) as c:
        keeper = c.session(KEEPER)
        assert keeper.info().layer_lengths == before[1]
        assert caches(keeper, 3) == before[0]
    logs = srv.logs()
    for bad in ("rpc_failed", "Traceback", " exc="):
        assert bad not in logs, logs[-3000:]
