"""The service through its raw gRPC stubs: method names, bearer metadata, AttendItems, and
``Driver``, a raw-stub client for scripted workloads."""

from __future__ import annotations

import grpc
import numpy as np

from harness.geometry import GEOM, Geo
from harness.tensors import qkv
from q8kv import wire
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

SERVICE = "q8kv.v1.KVCacheService"


def method_path(name: str) -> str:
    """The HTTP/2 path of a KVCacheService method: ``/q8kv.v1.KVCacheService/<name>``."""
    return f"/{SERVICE}/{name}"


def stub(channel: grpc.Channel) -> kvcache_pb2_grpc.KVCacheServiceStub:
    return kvcache_pb2_grpc.KVCacheServiceStub(channel)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def attend_item(
    session_id: str, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, dtype=None
) -> pb.AttendItem:
    """An AttendItem of these tensors (sent as ``dtype`` when given)."""
    return pb.AttendItem(
        session_id=session_id, layer=layer, q=wire.encode(q, dtype), k=wire.encode(k, dtype),
        v=wire.encode(v, dtype),
    )


def random_item(
    session_id: str, layer: int, rng: np.random.Generator, n: int = 1, geo: Geo = GEOM
) -> pb.AttendItem:
    """An AttendItem of ``n`` random tokens for ``geo``."""
    return attend_item(session_id, layer, *qkv(rng, n, geo))


class Driver:
    """A raw-stub client: one channel, the RPCs the workloads need."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = stub(self.channel)
        self.rng = np.random.default_rng(1234)

    def close(self) -> None:
        self.channel.close()

    def create(self, sid: str, geo: Geo, ttl: float = 0.0) -> pb.SessionInfo:
        return self.stub.CreateSession(
            pb.CreateSessionRequest(session_id=sid, geometry=geo.pb(), ttl_seconds=ttl),
            timeout=10,
        ).session

    def item(
        self, sid: str, geo: Geo, layer: int, n: int, dtype=np.float32,
        k: np.ndarray | None = None,
    ) -> pb.AttendItem:
        """``n`` random tokens (keys ``k`` when given) for layer ``layer``, sent as ``dtype``."""
        q, random_k, v = qkv(self.rng, n, geo)
        return attend_item(sid, layer, q, random_k if k is None else k, v, dtype)

    def attend(self, *items: pb.AttendItem) -> pb.AppendAndAttendResponse:
        return self.stub.AppendAndAttend(pb.AppendAndAttendRequest(items=items), timeout=30)

    def expect_error(self, code: grpc.StatusCode, call, request) -> grpc.RpcError:
        try:
            call(request, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == code, f"expected {code.name}, got {exc.code()}: {exc.details()}"
            return exc
        raise AssertionError(f"expected {code.name}, the call succeeded")
