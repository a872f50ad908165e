"""``q8kv-server``: build the backend, the cache and the engine, serve gRPC until
SIGTERM/SIGINT, then drain (in-flight calls finish, new ones get UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from q8kv.v1 import kvcache_pb2, kvcache_pb2_grpc

from .backends import create_backend
from .backends.base import page_bytes
from .cache import PagePool, SessionStore
from .config import Config, load_config
from .engine import Engine
from .logs import event, setup_logging
from .metrics import Metrics
from .service import KVCacheService

log = logging.getLogger("q8kv.server")

SERVICE_NAME = kvcache_pb2.DESCRIPTOR.services_by_name["KVCacheService"].full_name
CPU_DEFAULT_BUDGET = 2 * 1024**3
SWEEP_SECONDS = 1.0


def _budget_bytes(config: Config, backend_name: str) -> int:
    if config.memory_budget is not None:
        return config.memory_budget
    if backend_name == "cupy":
        from .backends.cupy_backend import CupyBackend

        return int(CupyBackend.free_device_bytes() * 0.8)
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
        interceptors = []
        on_items = None
        if config.metrics_port >= 0:
            self.metrics = Metrics(
                self.engine.store, self.engine.backend, config.quant_error_sample_rate
            )
            self.engine.observer = self.metrics.engine_observer()
            interceptors.append(self.metrics.interceptor())
            on_items = self.metrics.sample_quantization
        self.health = health.aio.HealthServicer()
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.grpc = grpc.aio.server(interceptors=interceptors, options=options)
        kvcache_pb2_grpc.add_KVCacheServiceServicer_to_server(
            KVCacheService(self.engine, on_items=on_items), self.grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = self.grpc.add_insecure_port(f"{config.host}:{config.port}")
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._sweeper: asyncio.Task | None = None

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
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
        event(log, "draining", grace_seconds=grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._sweeper:
            self._sweeper.cancel()
        await self.grpc.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop, grace)
        self.engine.backend.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        event(log, "stopped")


async def serve(config: Config) -> None:
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    setup_logging(config.log_level, config.log_format)
    event(log, "config", **{k: v for k, v in vars(config).items()})
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
