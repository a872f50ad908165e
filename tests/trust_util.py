"""Helpers shared by the issue-6 (trust) tests: tensors, raw stubs, metrics and log waits."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np

from q8kv import wire
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

GEOM = dict(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=64, max_len=4096)
SERVICE = "/q8kv.v1.KVCacheService/"


def qkv(rng, n, geom=GEOM, dtype=np.float32):
    h, kvh, d = geom["num_heads"], geom["num_kv_heads"], geom["head_dim"]
    return tuple(
        (rng.standard_normal((n, heads, d)) * rng.uniform(0.5, 2.0)).astype(dtype)
        for heads in (h, kvh, kvh)
    )


def fill(session, rng, lengths, geom=GEOM):
    """Append ``lengths[layer]`` tokens to each layer (in two calls where possible)."""
    for layer, n in enumerate(lengths):
        for part in (n // 2, n - n // 2):
            if part:
                session.append_and_attend(layer, *qkv(rng, part, geom))


def caches(session, layers):
    """Dequantized (K, V) of every layer, as raw bytes for bit-exact comparison."""
    return [tuple(a.tobytes() for a in session.dequantize(layer)) for layer in range(layers)]


def stub(channel) -> kvcache_pb2_grpc.KVCacheServiceStub:
    return kvcache_pb2_grpc.KVCacheServiceStub(channel)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def attend_item(session_id: str, layer: int, rng, n: int = 1, geom=GEOM) -> pb.AttendItem:
    q, k, v = qkv(rng, n, geom)
    return pb.AttendItem(
        session_id=session_id, layer=layer, q=wire.encode(q), k=wire.encode(k),
        v=wire.encode(v),
    )


def metric(url: str, name: str) -> float:
    """The value of an unlabelled sample ``name`` on a /metrics page."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not on {url}"
    return float(match.group(1))


def wait_for_log(server, text: str, count: int = 1, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = server.logs()
        if logs.count(text) >= count:
            return logs
        time.sleep(0.05)
    raise AssertionError(f"{text!r} x{count} not logged within {timeout}s:\n{server.logs()}")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
