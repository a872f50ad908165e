"""Helpers shared by the observability tests (metrics, Prometheus, logs): drive a server with
the raw gRPC stubs, scrape and parse its /metrics endpoint.

Import as ``from observability import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from q8kv import wire
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

SERVICE = "q8kv.v1.KVCacheService"


@dataclass(frozen=True)
class Geo:
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    max_len: int = 4096

    def pb(self) -> pb.Geometry:
        return pb.Geometry(
            num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
            head_dim=self.head_dim, max_len=self.max_len,
        )

    def q8_bytes(self, tokens: int) -> int:
        """Codes + scales of ``tokens`` tokens of one layer: tokens * 2 * KVH * D / 32 * 36."""
        return tokens * 2 * self.kv_heads * self.head_dim // 32 * 36

    def values(self, tokens: int) -> int:
        return tokens * 2 * self.kv_heads * self.head_dim


def page_bytes(page_code_bytes: int) -> int:
    return page_code_bytes * 9 // 8  # codes + one float32 scale per 32 codes


def pages_for(tokens: int, tokens_per_page: int) -> int:
    return math.ceil(tokens / tokens_per_page)


class Driver:
    """A raw-stub client: one channel, the RPCs the workloads need."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = kvcache_pb2_grpc.KVCacheServiceStub(self.channel)
        self.rng = np.random.default_rng(1234)

    def close(self) -> None:
        self.channel.close()

    def create(self, sid: str, geo: Geo, ttl: float = 0.0) -> pb.SessionInfo:
        return self.stub.CreateSession(
            pb.CreateSessionRequest(session_id=sid, geometry=geo.pb(), ttl_seconds=ttl),
            timeout=10,
        ).session

    def item(
        self, sid: str, geo: Geo, layer: int, n: int, zeros: bool = False, dtype=np.float32,
        k: np.ndarray | None = None,
    ) -> pb.AttendItem:
        def tensor(heads: int) -> np.ndarray:
            shape = (n, heads, geo.head_dim)
            if zeros:
                return np.zeros(shape, np.float32)
            return self.rng.standard_normal(shape).astype(np.float32)

        return pb.AttendItem(
            session_id=sid, layer=layer,
            q=wire.encode(tensor(geo.heads), dtype),
            k=wire.encode(tensor(geo.kv_heads) if k is None else k, dtype),
            v=wire.encode(tensor(geo.kv_heads), dtype),
        )

    def attend(self, *items: pb.AttendItem) -> pb.AppendAndAttendResponse:
        return self.stub.AppendAndAttend(pb.AppendAndAttendRequest(items=items), timeout=30)

    def expect_error(self, code: grpc.StatusCode, call, request) -> grpc.RpcError:
        try:
            call(request, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == code, f"expected {code.name}, got {exc.code()}: {exc.details()}"
            return exc
        raise AssertionError(f"expected {code.name}, the call succeeded")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


class Samples:
    """A parsed scrape: ``get(name, **labels)`` -> the one matching sample's value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]
        self.names = {s.name for s in self.samples}

    def find(self, name: str, **labels: str) -> list:
        return [
            s for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def get(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        assert len(found) == 1, f"{name}{labels}: expected one sample, got {found}"
        return found[0].value

    def value_or_zero(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        assert len(found) <= 1, f"{name}{labels}: expected at most one sample, got {found}"
        return found[0].value if found else 0.0

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """(le, cumulative count) of a histogram, in order."""
        return sorted(
            (float(s.labels["le"]), s.value) for s in self.find(name + "_bucket", **labels)
        )
