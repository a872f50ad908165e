"""``q8kv-server``: wire a Config into a server (backend, cache, engine, RPC layer), serve
gRPC until SIGTERM/SIGINT, then drain (in-flight calls finish, new ones get UNAVAILABLE)
and save the snapshot. The only module that imports every room of the house."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from q8kv.format import page_bytes
from q8kv.v1 import kvcache_pb2, kvcache_pb2_grpc

from . import startup
from .backends import GpuTuning, create_backend
from .cache import PagePool, SessionStore
from .config import Config, ConfigError, load_config
from .engine import Engine
from .malloc import retain_freed_memory
from .observability.logs import event, setup_logging
from .observability.metrics import Metrics
from .rpc.drain import Drain
from .rpc.front import Front
from .rpc.messages import CallLimits
from .rpc.servicer import KVCacheService

log = logging.getLogger("q8kv.server")

SERVICE_NAME = kvcache_pb2.DESCRIPTOR.services_by_name["KVCacheService"].full_name
CPU_DEFAULT_BUDGET = 2 * 1024**3
SWEEP_SECONDS = 1.0
DRAIN_LINGER_SECONDS = 0.5


def _budget_bytes(config: Config, backend_name: str) -> int:
    if config.memory_budget is not None:
        return config.memory_budget
    if backend_name == "cupy":
        from .backends.cupy.backend import CupyBackend

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
        raise ConfigError(
            f"--memory-budget: expected room for at least one page "
            f"({page_bytes(config.page_bytes)} bytes with scales), got {budget} bytes"
        )
    try:
        backend = create_backend(
            name, num_pages, config.page_bytes, GpuTuning.from_config(config)
        )
    except ValueError as exc:  # a tuning the device cannot run: the message names the flags
        raise ConfigError(str(exc)) from None
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
    return Engine(
        backend, store, batch_items, config.max_queue_delay_us,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
    )


class Server:
    """The running service; tests and benchmarks may also start it in-process.

    The constructor checks and binds everything a configuration can get wrong (tokens,
    TLS files, snapshot directory, memory budget, ports) and raises ConfigError; nothing
    is loaded or served until ``start``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokens = startup.token_table(config)
        credentials = startup.tls_credentials(config) if config.tls_cert else None
        self.snapshots = startup.snapshot_dir(config)
        self.engine = build_engine(config)
        self.metrics: Metrics | None = None
        self.drain = Drain()
        on_appended = None
        if config.metrics_port >= 0:
            self.metrics = Metrics(
                self.engine.store, self.engine.backend, config.quant_error_sample_rate
            )
            self.engine.observer = self.metrics.engine_observer()
            on_appended = self.metrics.sample_quantization
        self.health = health.aio.HealthServicer()
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.grpc = grpc.aio.server(options=options)
        servicer = KVCacheService(
            self.engine,
            drain=self.drain,
            on_appended=on_appended,
            limits=CallLimits(
                config.max_items_per_call, config.max_tokens_per_call, config.max_message_bytes
            ),
        )
        Front(self.drain, self.tokens, self.metrics).register(
            self.grpc,
            lambda server: kvcache_pb2_grpc.add_KVCacheServiceServicer_to_server(servicer, server),
            lambda server: health_pb2_grpc.add_HealthServicer_to_server(self.health, server),
            lambda server: reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer(
                    (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
                ),
                server,
            ),
        )
        self.port = startup.listen(self.grpc, f"{config.host}:{config.port}", credentials)
        self.metrics_port: int | None = None
        self._metrics_http = None
        if self.metrics is not None:
            self._metrics_http = startup.serve_metrics(self.metrics, config)
            self.metrics_port = self._metrics_http.server_port
        self._sweeper: asyncio.Task | None = None
        self._loaded = False  # a save may replace the snapshot only after a whole load

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Load the snapshot, then serve. False (nothing served) if ``stopping()`` turned
        true while loading: the caller then ``close``s without saving."""
        if self.snapshots is not None:
            store, backend = self.engine.store, self.engine.backend
            if not await self.snapshots.load(store, backend, stopping):
                return False
        self._loaded = True
        self.engine.start()
        await self.grpc.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.create_task(self._sweep())
        backend = self.engine.backend
        event(
            log, "listening", host=self.config.host, port=self.port,
            metrics_port=self.metrics_port, backend=backend.name, device=backend.device_name,
            pages=backend.num_pages, page_code_bytes=self.config.page_bytes,
            page_device_bytes=self.engine.page_bytes,
            budget_bytes=backend.num_pages * self.engine.store.pool.page_bytes,
            max_sessions=self.config.max_sessions, session_ttl=self.config.session_ttl,
        )
        return True

    async def _sweep(self) -> None:
        """Expire idle sessions even when no new work arrives to trigger eviction."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            with contextlib.suppress(Exception):
                await self.engine.evict_expired()

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
        if self.snapshots is not None and self._loaded:
            directory, store, backend = self.snapshots, self.engine.store, self.engine.backend
            await self.engine.call(lambda: directory.save(store, backend))
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop, grace)
        await self.close()

    async def close(self) -> None:
        """Release what the constructor took (the stop path, or a start cut short)."""
        await self.grpc.stop(None)
        self.engine.backend.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        event(log, "stopped")


async def serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    server: Server | None = None

    def reload_tokens() -> None:
        if server is not None:
            server.tokens.reload()

    def request_stop(sig: signal.Signals) -> None:
        event(log, "stop_requested", signal=sig.name)
        stop.set()

    # Before anything is loaded: SIGTERM while loading snapshots must end the start
    # cleanly, and SIGHUP's default action would end the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, reload_tokens)
    server = Server(config)
    event(log, "config", **vars(config))  # paths and sizes only: tokens live in files/env
    if not await server.start(stop.is_set):
        await server.close()  # stopped while loading: nothing served, nothing saved
        return
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    setup_logging(config.log_level, config.log_format)
    retain_freed_memory(config.malloc_retain_bytes)  # process-wide: before any large buffer
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # one line and status 2, like a bad flag
        print(f"q8kv-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
