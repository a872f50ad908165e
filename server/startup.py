"""What a configuration can get wrong, checked and bound before anything is loaded or
served: each failure is a ConfigError naming the flag, the expected and the actual value
(``q8kv-server`` prints it as one line and exits 2)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from .config import Config, ConfigError
from .observability.metrics import Metrics
from .persistence import snapshots
from .rpc.auth import TokenTable


def token_table(config: Config) -> TokenTable:
    try:
        return TokenTable(config.auth_tokens_file, os.environ.get("Q8KV_AUTH_TOKENS"))
    except ValueError as exc:  # names the file (or variable) and the entry, not the secret
        raise ConfigError(f"--auth-tokens-file: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            f"--auth-tokens-file: expected a readable file, got {config.auth_tokens_file!r} "
            f"({exc.strerror})"
        ) from None


def snapshot_dir(config: Config) -> snapshots.SnapshotDir | None:
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


def listen(server: grpc.aio.Server, address: str, credentials) -> int:
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


def serve_metrics(metrics: Metrics, config: Config):
    try:
        server, _ = metrics.serve_http(config.host, config.metrics_port)
    except OSError as exc:
        raise ConfigError(
            f"--metrics-port: expected a free port, got {config.host}:{config.metrics_port} "
            f"({exc.strerror or exc})"
        ) from None
    return server


def tls_credentials(config: Config) -> grpc.ServerCredentials:
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
