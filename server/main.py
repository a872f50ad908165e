"""``q8kv-server``: build the backend, the cache and the engine, serve gRPC until
SIGTERM/SIGINT, then drain (in-flight calls finish, new ones get UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from q8kv.v1 import kvcache_pb2, kvcache_pb2_grpc

from . import snapshots
from .auth import AuthInterceptor, TokenTable, tenant_of_call
from .backends import create_backend
from .backends.base import page_bytes
from .cache import PagePool, SessionStore
from .config import Config, load_config
from .drain import DrainInterceptor
from .engine import Engine
from .interceptors import DecodeGuard
from .logs import event, setup_logging
from .metrics import Metrics
from .service import CallLimits, KVCacheService

log = logging.getLogger("q8kv.server")

SERVICE_NAME = kvcache_pb2.DESCRIPTOR.services_by_name["KVCacheService"].full_name
CPU_DEFAULT_BUDGET = 2 * 1024**3
SWEEP_SECONDS = 1.0
DRAIN_LINGER_SECONDS = 0.5


def _budget_bytes(config: Config, backend_name: str) -> int:
    if config.memory_budget is not None:
        return config.memory_budget
    if backend_name == "cupy":
        from .backends.cupy_backend import CupyBackend

        # Headroom for per-call buffers and the kernels' first compile.
        return max(0, int(CupyBackend.free_device_bytes() * 0.9) - 512 * 1024**2)
    return CPU_DEFAULT_BUDGET


def build_engine(config: Config) -> Engine:
    from .backends import cuda_available

    name = config.backend
    if name == "auto":
        name = "cupy" if cuda_available() else "numpy"
    budget = _budget_bytes(config, name)
    num_pages = budget // page_bytes(config.page_bytes)
    if num_pages < 1:
        raise SystemExit(f"--memory-budget: {budget} bytes hold no page of {config.page_bytes}")
    backend = create_backend(name, num_pages, config.page_bytes)
    store = SessionStore(
        PagePool(num_pages, config.page_bytes),
        max_sessions=config.max_sessions,
        default_ttl=config.session_ttl,
        evict_idle_seconds=config.evict_idle_seconds,
        tenant_max_sessions=config.tenant_max_sessions,
        tenant_max_pages=config.tenant_max_bytes // page_bytes(config.page_bytes),
        max_head_dim=backend.max_head_dim,
    )
    store.listeners.append(
        lambda session, reason: event(log, "session_evicted", session=session.id, reason=reason)
    )
    # Batching off: every request is its own device call (for comparison benchmarks).
    batch_items = config.max_batch_items if config.batching == "on" else 0
    return Engine(backend, store, batch_items, config.max_queue_delay_us)


class Server:
    """The running service; tests and benchmarks may also start it in-process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = build_engine(config)
        self.metrics: Metrics | None = None
        self.drain = DrainInterceptor()
        interceptors: list[grpc.aio.ServerInterceptor] = []
        on_items = None
        self.tokens = TokenTable(config.auth_tokens_file, os.environ.get("Q8KV_AUTH_TOKENS"))
        if config.metrics_port >= 0:
            self.metrics = Metrics(
                self.engine.store, self.engine.backend, config.quant_error_sample_rate
            )
            self.engine.observer = self.metrics.engine_observer()
            interceptors.append(self.metrics.interceptor())
            on_items = self.metrics.sample_quantization
        if self.tokens.enabled:  # inside the metrics one, so refusals are counted too
            interceptors.append(AuthInterceptor(self.tokens))
        interceptors.append(self.drain)
        interceptors.append(DecodeGuard())  # innermost: its deserializer is the one used
        self.health = health.aio.HealthServicer()
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.grpc = grpc.aio.server(interceptors=interceptors, options=options)
        kvcache_pb2_grpc.add_KVCacheServiceServicer_to_server(
            KVCacheService(
                self.engine,
                tenant_of=tenant_of_call,
                on_items=on_items,
                limits=CallLimits(config.max_items_per_call, config.max_tokens_per_call),
            ),
            self.grpc,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            self.port = self.grpc.add_secure_port(address, _tls_credentials(config))
        else:
            self.port = self.grpc.add_insecure_port(address)
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._sweeper: asyncio.Task | None = None

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        if self.config.snapshot_dir:
            snapshots.load_all(
                self.engine.store, self.engine.backend, Path(self.config.snapshot_dir)
            )
        self.engine.start()
        await self.grpc.start()
        if self.metrics is not None:
            self._metrics_http, _ = self.metrics.serve_http(
                self.config.host, self.config.metrics_port
            )
            self.metrics_port = self._metrics_http.server_port
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.create_task(self._sweep())
        backend = self.engine.backend
        event(
            log, "listening", host=self.config.host, port=self.port,
            metrics_port=self.metrics_port, backend=backend.name, device=backend.device_name,
            pages=backend.num_pages, page_bytes=self.engine.store.pool.page_bytes,
            budget_bytes=backend.num_pages * self.engine.store.pool.page_bytes,
            max_sessions=self.config.max_sessions, session_ttl=self.config.session_ttl,
        )

    async def _sweep(self) -> None:
        """Expire idle sessions even when no new work arrives to trigger eviction."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            with contextlib.suppress(Exception):
                await self.engine.call(self.engine.store.evict_expired)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_seconds if grace is None else grace
        # From here new calls, and further messages of open streams, get UNAVAILABLE.
        self.drain.draining = True
        event(log, "draining", grace_seconds=grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._sweeper:
            self._sweeper.cancel()
        started = time.monotonic()

        def left() -> float:
            return max(0.0, grace - (time.monotonic() - started))

        # Refuse new calls with UNAVAILABLE for a moment first: calls that reach gRPC after
        # its own shutdown begins are cancelled with no reason given.
        await asyncio.sleep(min(DRAIN_LINGER_SECONDS, left()))
        finished = await self.drain.wait_idle(left())
        await self.grpc.stop(left())
        event(log, "drained", in_flight_cut=0 if finished else self.drain.in_flight)
        if self.config.snapshot_dir:
            directory = Path(self.config.snapshot_dir)
            store, backend = self.engine.store, self.engine.backend
            await self.engine.call(lambda: snapshots.save_all(store, backend, directory))
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop, grace)
        self.engine.backend.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        event(log, "stopped")


def _tls_credentials(config: Config) -> grpc.ServerCredentials:
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def serve(config: Config) -> None:
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.tokens.reload)
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    setup_logging(config.log_level, config.log_format)
    event(log, "config", **vars(config))  # paths and sizes only: tokens live in files/env
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
