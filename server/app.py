"""``q8kv-server``: build the backend, the cache and the engine, serve gRPC until
SIGTERM/SIGINT, then drain (in-flight calls finish, new ones get UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from q8kv.v1 import kvcache_pb2, kvcache_pb2_grpc

from . import snapshots
from .auth import AuthInterceptor, TokenTable, tenant_of_call
from .backends import GpuTuning, create_backend
from .backends.base import page_bytes
from .cache import PagePool, SessionStore
from .config import Config, ConfigError, load_config
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
    backend = create_backend(name, num_pages, config.page_bytes, GpuTuning.from_config(config))
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
    """The running service; tests and benchmarks may also start it in-process.

    The constructor checks and binds everything a configuration can get wrong (tokens,
    TLS files, snapshot directory, memory budget, ports) and raises ConfigError; nothing
    is loaded or served until ``start``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokens = _token_table(config)
        credentials = _tls_credentials(config) if config.tls_cert else None
        self.snapshots = _snapshot_dir(config)
        self.engine = build_engine(config)
        self.metrics: Metrics | None = None
        self.drain = DrainInterceptor()
        interceptors: list[grpc.aio.ServerInterceptor] = []
        on_items = None
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
                limits=CallLimits(
                    config.max_items_per_call, config.max_tokens_per_call, config.max_message_bytes
                ),
            ),
            self.grpc,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = _listen(self.grpc, f"{config.host}:{config.port}", credentials)
        self.metrics_port: int | None = None
        self._metrics_http = None
        if self.metrics is not None:
            self._metrics_http = _serve_metrics(self.metrics, config)
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
            pages=backend.num_pages, page_bytes=self.engine.store.pool.page_bytes,
            budget_bytes=backend.num_pages * self.engine.store.pool.page_bytes,
            max_sessions=self.config.max_sessions, session_ttl=self.config.session_ttl,
        )
        return True

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


def _token_table(config: Config) -> TokenTable:
    try:
        return TokenTable(config.auth_tokens_file, os.environ.get("Q8KV_AUTH_TOKENS"))
    except ValueError as exc:  # names the file (or variable) and the entry, not the secret
        raise ConfigError(f"--auth-tokens-file: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            f"--auth-tokens-file: expected a readable file, got {config.auth_tokens_file!r} "
            f"({exc.strerror})"
        ) from None


def _snapshot_dir(config: Config) -> snapshots.SnapshotDir | None:
    if not config.snapshot_dir:
        return None
    directory = snapshots.SnapshotDir(Path(config.snapshot_dir))
    try:
        directory.prepare()
    except OSError as exc:
        raise ConfigError(
            f"--snapshot-dir: expected a writable directory, got {config.snapshot_dir!r} "
            f"({exc.strerror or exc})"
        ) from None
    return directory


@contextlib.contextmanager
def _core_stderr() -> Iterator[list[str]]:
    """Hold back what gRPC's C core writes to stderr meanwhile (its own error lines on a
    failed bind), so a failure reads as our one line; replayed when nothing failed."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as spool:
        os.dup2(spool.fileno(), 2)
        failed = False
        try:
            yield captured
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            spool.seek(0)
            text = spool.read().decode(errors="replace")
            captured.extend(line for line in text.splitlines() if line.strip())
            if text and not failed:
                sys.stderr.write(text)


def _listen(server: grpc.aio.Server, address: str, credentials) -> int:
    try:
        with _core_stderr() as core:
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)
    except RuntimeError:
        # The core's own lines say why: address in use, a certificate it cannot use.
        detail = "; ".join(line.split("] ", 1)[-1] for line in core) or "bind failed"
        flags = "--host/--port" + (" with --tls-cert/--tls-key" if credentials else "")
        raise ConfigError(
            f"{flags}: expected an address this server can listen on, got {address} "
            f"({detail})"
        ) from None


def _serve_metrics(metrics: Metrics, config: Config):
    try:
        server, _ = metrics.serve_http(config.host, config.metrics_port)
    except OSError as exc:
        raise ConfigError(
            f"--metrics-port: expected a free port, got {config.host}:{config.metrics_port} "
            f"({exc.strerror or exc})"
        ) from None
    return server


def _tls_credentials(config: Config) -> grpc.ServerCredentials:
    def read(flag: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{flag}: expected a readable PEM file, got {path!r} ({exc.strerror or exc})"
            ) from None

    key = read("--tls-key", config.tls_key)
    cert = read("--tls-cert", config.tls_cert)
    client_ca = read("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


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
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # one line and status 2, like a bad flag
        print(f"q8kv-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
