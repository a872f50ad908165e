"""Prometheus metrics: memory saved, kernel and queue latency, batching, quantization error,
and the go-grpc-prometheus RPC set (so existing dashboards and alerts work unchanged).

Each server has its own registry (tests run several in one process). Memory gauges read
O(1) counters the cache keeps exact on every change, at scrape time. No session id is ever
a label value.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib import metadata

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from q8kv import format as q8

from ..backends.base import Backend
from ..cache import SessionStore
from ..config import Config
from ..engine import EngineObserver

SAMPLE_TOKENS = 64  # tokens of one appended item that the quantization-error sample reads


def quantization_error(k: np.ndarray, v: np.ndarray) -> float | None:
    """||stored - sent|| / ||sent|| of k and v through the Q8 format (None for all zeros)."""
    sent = np.empty((2, *k.shape), np.float32)  # filled: k and v may differ in dtype
    sent[0], sent[1] = k, v
    stored = q8.dequantize(*q8.quantize(sent))
    # In float64: the sum of squares of values near the 1e15 input bound overflows float32,
    # and one NaN would poison the histogram's sum for good.
    norm = float(np.linalg.norm(sent.astype(np.float64)))
    if norm == 0:
        return None
    return float(np.linalg.norm(stored.astype(np.float64) - sent)) / norm

KERNEL_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
)
RPC_BUCKETS = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ERROR_BUCKETS = (1e-4, 5e-4, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 8e-3, 1e-2, 2e-2, 5e-2, 0.1)


def _version() -> str:
    try:
        return metadata.version("q8kv")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(
        self,
        store: SessionStore,
        backend: Backend,
        quant_error_sample_rate: float = Config.quant_error_sample_rate,  # the flag's default
    ) -> None:
        self.registry = CollectorRegistry()
        self.quant_error_sample_rate = quant_error_sample_rate
        self._sampler = np.random.default_rng()
        self._memory_gauges(store)
        self._engine_metrics(store, backend)
        self._rpc_metrics()
        self._kernels: dict[str, tuple] = {}
        backend.on_kernel = self.observe_kernel

    def _memory_gauges(self, store: SessionStore) -> None:
        r, pool = self.registry, store.pool

        def gauge(name: str, doc: str, read) -> Gauge:
            g = Gauge(name, doc, registry=r)
            g.set_function(read)
            return g

        gauge("q8kv_cache_bytes", "Q8 codes + scales of every session's cached tokens (a "
              "token shared by forks counted for each session)", store.cache_bytes)
        gauge("q8kv_cache_fp32_equivalent_bytes", "Bytes the cached tokens would take in fp32",
              store.fp32_equivalent_bytes)
        gauge("q8kv_cache_fp16_equivalent_bytes", "Bytes the cached tokens would take in fp16",
              store.fp16_equivalent_bytes)
        gauge(
            "q8kv_cache_compression_ratio",
            "fp32-equivalent bytes over q8kv_cache_bytes (0 while nothing is cached)",
            lambda: store.fp32_equivalent_bytes() / max(store.cache_bytes(), 1),
        )
        gauge("q8kv_pool_capacity_bytes", "Bytes of the page pool (the memory budget in pages)",
              lambda: pool.num_pages * pool.page_bytes)
        gauge("q8kv_pool_used_bytes", "Bytes of pages handed out, partly filled ones included "
              "(a page shared by forks counted once)", lambda: pool.used_pages * pool.page_bytes)
        gauge("q8kv_pool_shared_saved_bytes", "Bytes that sharing pages between forks saves: "
              "every reference to a page beyond its first",
              lambda: pool.shared_saved_pages * pool.page_bytes)
        gauge("q8kv_sessions_active", "Live sessions", lambda: len(store))

    def _engine_metrics(self, store: SessionStore, backend: Backend) -> None:
        r = self.registry
        self.evicted = Counter(
            "q8kv_sessions_evicted", "Sessions evicted, by reason (ttl, lru)", ["reason"],
            registry=r,
        )
        for reason in ("ttl", "lru"):
            self.evicted.labels(reason)
        store.listeners.append(lambda session, reason: self.evicted.labels(reason).inc())
        self.tokens = Counter(
            "q8kv_tokens_appended", "Tokens appended to session-layer caches", registry=r
        )
        self.launch = Histogram(
            "q8kv_kernel_launch_seconds", "Host time to enqueue a kernel", ["kernel"],
            buckets=KERNEL_BUCKETS, registry=r,
        )
        self.device = Histogram(
            "q8kv_kernel_device_seconds",
            "Kernel time on the device (CUDA events); on the numpy backend the op's wall time",
            ["kernel"], buckets=KERNEL_BUCKETS, registry=r,
        )
        self.batch_items = Histogram(
            "q8kv_batch_items", "(session, layer) items per device launch",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue = Histogram(
            "q8kv_queue_seconds", "Time a request waited for the device",
            buckets=KERNEL_BUCKETS, registry=r,
        )
        self.quant_error = Histogram(
            "q8kv_quantization_relative_error",
            "Relative RMS error of dequantized k/v against what was sent, sampled on appends",
            buckets=ERROR_BUCKETS, registry=r,
        )
        info = Gauge(
            "q8kv_build_info", "Build and runtime information (value 1)",
            ["version", "backend", "device"], registry=r,
        )
        info.labels(_version(), backend.name, backend.device_name).set(1)

    def _rpc_metrics(self) -> None:
        """The go-grpc-prometheus set, counted by the front door (``rpc_method``)."""
        r = self.registry
        self.rpc_started = Counter(
            "grpc_server_started", "RPCs started on the server",
            ["grpc_type", "grpc_service", "grpc_method"], registry=r,
        )
        self.rpc_handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, regardless of success",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"], registry=r,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds", "Response latency of RPCs handled by the server",
            ["grpc_type", "grpc_service", "grpc_method"], buckets=RPC_BUCKETS, registry=r,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received", "Stream messages received by the server",
            ["grpc_type", "grpc_service", "grpc_method"], registry=r,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "Stream messages sent by the server",
            ["grpc_type", "grpc_service", "grpc_method"], registry=r,
        )

    # -- hooks -------------------------------------------------------------------------------

    def observe_kernel(self, kernel: str, launch_seconds: float, device_seconds: float) -> None:
        children = self._kernels.get(kernel)
        if children is None:  # resolve labels once per kernel: labels() costs microseconds
            children = self._kernels[kernel] = (self.launch.labels(kernel),
                                                self.device.labels(kernel))
        children[0].observe(launch_seconds)
        children[1].observe(device_seconds)

    def engine_observer(self) -> EngineObserver:
        return EngineObserver(
            on_batch=lambda items, seconds: self.batch_items.observe(items),
            on_queue_wait=self.queue.observe,
            on_append=self.tokens.inc,
        )

    def sample_quantization(self, k: Sequence[np.ndarray], v: Sequence[np.ndarray]) -> None:
        """Quantize a sample of the appended items (``k[i]``, ``v[i]``: item i's
        [n, KVH, D]; a packed call passes its [B, n, KVH, D] arrays) here (codes are
        bit-identical on every backend) and record how far the stored values are from what
        was sent. Each item is sampled with probability ``quant_error_sample_rate``: one
        binomial draw per call picks how many, so a B = 64 call costs no per-item loop."""
        picks = self._sampler.binomial(len(k), self.quant_error_sample_rate)
        if not picks:
            return
        for i in sorted(self._sampler.choice(len(k), picks, replace=False).tolist()):
            # At most SAMPLE_TOKENS tokens of an item: the whole of an 8k-token prefill
            # costs the event loop 0.4-0.7 s of numpy (benchmarks/prefill_messages.py).
            first = int(self._sampler.integers(max(1, len(k[i]) - SAMPLE_TOKENS + 1)))
            error = quantization_error(k[i][first : first + SAMPLE_TOKENS],
                                       v[i][first : first + SAMPLE_TOKENS])  # fmt: skip
            if error is not None:
                self.quant_error.observe(error)

    def rpc_method(self, path: str, kind: str) -> MethodMetrics:
        """The labelled children of one method (``/service/Method``, its declared kind),
        for the front door to count and time each call with."""
        service, _, method = path.lstrip("/").rpartition("/")
        return MethodMetrics(self, kind, service, method)

    def serve_http(self, host: str, port: int):
        """Start the /metrics endpoint in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)


_RPC_TYPES = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}
# context.code() gives a StatusCode, or on some paths its numeric value.
_CODE_NAMES: dict = {c: c.name for c in grpc.StatusCode} | {
    c.value[0]: c.name for c in grpc.StatusCode
}


class MethodMetrics:
    """The labelled children of one method, resolved once (``labels()`` costs microseconds
    per call, which the decode-step round trip notices)."""

    def __init__(self, m: Metrics, kind: str, service: str, method: str) -> None:
        labels = (_RPC_TYPES[kind], service, method)
        self.labels = labels
        self.handled_family = m.rpc_handled
        self.started = m.rpc_started.labels(*labels)
        self.seconds = m.rpc_seconds.labels(*labels)
        self.received = m.msg_received.labels(*labels)
        self.sent = m.msg_sent.labels(*labels)
        self.handled: dict[str, Counter] = {}

    def finish(self, context, started: float, failed: BaseException | None) -> None:
        code = context.code()
        if code is None and context.cancelled():
            name = "CANCELLED"
        elif code is None:
            name = "OK" if failed is None else "UNKNOWN"
        else:
            name = _CODE_NAMES.get(code, "UNKNOWN")
        child = self.handled.get(name)
        if child is None:
            child = self.handled[name] = self.handled_family.labels(*self.labels, name)
        child.inc()
        self.seconds.observe(time.perf_counter() - started)
