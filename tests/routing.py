"""Render deploy/nginx.conf (the router of docker-compose.yml) for other addresses, run
nginx with it: the loopback router test, the config checks and benchmarks/multiprocess.py
use the project's own file, changed only where an address or a path must differ.

Packed calls (AttendBatch) route as a whole by their one ``x-session-id`` header, so the
sessions of one micro-batch must live on one replica: create them all through the router
under one routing key (``create_group``) and send their batches with it (``routed``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from harness.geometry import Geo
from harness.proc import stop_process
from harness.server import REPO
from reference import attention_ref

from q8kv import wire
from q8kv.client.channel import SESSION_HEADER
from q8kv.v1 import kvcache_pb2 as pb

NGINX_CONF = REPO / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

_REPLICAS = re.compile(r"(?ms)^(\s*)# replicas: begin\n.*?^\s*# replicas: end\n")


def _sub(pattern: str, repl: str, text: str) -> str:
    out, n = re.subn(pattern, repl, text, count=1, flags=re.M)
    if n != 1:  # the file changed shape: say so instead of testing a half-rendered config
        raise ValueError(f"deploy/nginx.conf: no line matches {pattern!r}")
    return out


def with_replicas(
    text: str, replicas: Sequence[str], server_params: str = "max_fails=1 fail_timeout=5s"
) -> str:
    """nginx.conf ``text`` with the lines between its `replicas:` markers (the markers
    included) replaced by one ``server`` line per address."""
    if not _REPLICAS.search(text):
        raise ValueError("deploy/nginx.conf: no '# replicas: begin/end' block")
    servers = "".join(f"\\1server {addr} {server_params};\n" for addr in replicas)
    return _REPLICAS.sub(servers, text, count=1)


def render(
    listen: str,
    replicas: Sequence[str],
    workdir: Path,
    source: Path = NGINX_CONF,
    server_params: str = "max_fails=1 fail_timeout=5s",
    workers: str | None = None,
    user: str | None = None,
) -> str:
    """deploy/nginx.conf with ``listen`` (e.g. "127.0.0.1:8443"), the replica addresses,
    pid/log/temp files under ``workdir`` and, if given, ``workers`` worker processes and
    the workers' ``user`` ("root root")."""
    text = with_replicas(source.read_text(), replicas, server_params)
    if workers is not None:
        text = _sub(r"^worker_processes\s+\S+;", f"worker_processes {workers};", text)
    if user is not None:
        text = _sub(r"^user\s+[^;]+;", f"user {user};", text)
    text = _sub(r"^(\s*)listen\s+\S+(\s+http2;)", rf"\g<1>listen {listen}\g<2>", text)
    text = _sub(r"^pid\s+\S+;", f"pid {workdir}/nginx.pid;", text)
    text = _sub(r"^error_log\s+\S+", f"error_log {workdir}/error.log", text)
    text = _sub(r"^(\s*)access_log\s+\S+", rf"\g<1>access_log {workdir}/access.log", text)
    # Temp files of a root-run nginx default to /var/lib/nginx; keep them with the test.
    temps = "".join(
        f"    {kind}_temp_path {workdir}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return _sub(r"^http \{\n", "http {\n" + temps, text)


def write(
    workdir: Path, listen: str, replicas: Sequence[str], workers: str | None = None,
    user: str | None = None,
) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    # A root-run nginx's workers are `nobody`: they must reach their temp dirs in here.
    os.chmod(workdir, 0o755)
    conf = workdir / "nginx.conf"
    conf.write_text(render(listen, replicas, workdir, workers=workers, user=user))
    return conf


def command(nginx: str, conf: Path, *args: str) -> list[str]:
    """nginx run on ``conf`` with its own prefix and error log (``-e``, nginx >= 1.19.5), so
    nothing of the binary's compiled-in paths (/etc/nginx, /var/log/nginx) is needed: an
    nginx unpacked from a .deb under /tmp runs as well as an installed one."""
    return [nginx, "-e", str(conf.parent / "error.log"), "-p", str(conf.parent),
            "-c", str(conf), *args]


def check(
    conf: Path, nginx: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``nginx -t`` on a rendered file (exit 0 when nginx accepts it)."""
    return subprocess.run(
        command(nginx or NGINX, conf, "-t", "-q"),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


class Router:
    """nginx in the foreground on ``port`` of 127.0.0.1, routing to ``replicas``; ``nginx``
    and ``env`` (LD_LIBRARY_PATH for an unpacked one) pick another binary."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        replicas: Sequence[str],
        nginx: str | None = None,
        env: dict[str, str] | None = None,
        workers: str | None = None,
        user: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.conf = write(workdir, self.address, replicas, workers, user)
        self.proc = subprocess.Popen(
            command(nginx or NGINX, self.conf, "-g", "daemon off;"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}:\n{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nginx not listening on {self.address}:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[str]:
        path = self.workdir / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def stop(self) -> None:
        stop_process(self.proc, 10)  # SIGTERM: nginx's fast shutdown


# --- checks of a routed session (the loopback and the container tests) ---------------

GEO = Geo(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_len=64)


def check_step(session, layer: int, q, k, v, sent_k: list[np.ndarray]) -> None:
    """One AppendAndAttend through the router, checked against the replica's own cache."""
    out, length = session.append_and_attend(layer, q, k, v, with_length=True)
    sent_k.append(k)
    assert length == sum(len(x) for x in sent_k)
    cache_k, cache_v = session.dequantize(layer)
    assert cache_k.shape == (GEO.num_kv_heads, length, GEO.head_dim)
    # The cache holds what was sent, to Q8 precision (half a step of each 32-value block).
    sent = np.concatenate(sent_k).transpose(1, 0, 2)
    step = np.abs(sent).reshape(*sent.shape[:-1], -1, 32).max(-1, keepdims=True) / 127
    err = np.abs(cache_k - sent).reshape(step.shape[:-1] + (32,))
    assert np.all(err <= step * 0.5 * (1 + 1e-4) + 1e-30)
    expected = attention_ref(q, cache_k, cache_v, length - len(q), 1 / np.sqrt(GEO.head_dim))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# --- packed calls through the router: one routing key per micro-batch -----------------


def routed(key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that routes by ``key`` (the header the router hashes)."""
    return ((SESSION_HEADER, key),)


def create_group(
    stub, ids: Sequence[str], geometry: pb.Geometry, key: str | None = None,
    timeout: float = 30.0,
) -> str:
    """Create sessions ``ids`` through the router, every one under the routing key ``key``
    (default: the first id), so they land on one replica; returns the key."""
    key = key or ids[0]
    for sid in ids:
        request = pb.CreateSessionRequest(session_id=sid, geometry=geometry)
        stub.CreateSession(request, metadata=routed(key), timeout=timeout)
    return key


def batch_request(ids: Sequence[str], layer: int, q, k, v) -> pb.AttendBatchRequest:
    """An AttendBatchRequest: q [B, n, H, D], k/v [B, n, KVH, D] in their own dtypes."""
    return pb.AttendBatchRequest(
        session_ids=list(ids), layer=layer, q=wire.encode(q), k=wire.encode(k),
        v=wire.encode(v),
    )


def holder(stubs: Sequence, sid: str, timeout: float = 10.0) -> int:
    """The index of the replica (a direct stub each) that holds session ``sid``."""
    found = []
    for index, stub in enumerate(stubs):
        try:
            stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=timeout)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            continue
        found.append(index)
    if len(found) != 1:
        raise AssertionError(f"session {sid!r}: expected on one replica, found on {found}")
    return found[0]
