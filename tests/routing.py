"""Render deploy/nginx.conf (the router of docker-compose.yml) for other addresses, run
nginx with it: the loopback router test and the config checks use the project's own file,
changed only where an address or a path must differ."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from harness.geometry import Geo
from harness.proc import stop_process
from harness.server import REPO
from reference import attention_ref

NGINX_CONF = REPO / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

_REPLICAS = re.compile(r"(?ms)^(\s*)# replicas: begin\n.*?^\s*# replicas: end\n")


def _sub(pattern: str, repl: str, text: str) -> str:
    out, n = re.subn(pattern, repl, text, count=1, flags=re.M)
    if n != 1:  # the file changed shape: say so instead of testing a half-rendered config
        raise ValueError(f"deploy/nginx.conf: no line matches {pattern!r}")
    return out


def render(
    listen: str,
    replicas: Sequence[str],
    workdir: Path,
    source: Path = NGINX_CONF,
    server_params: str = "max_fails=1 fail_timeout=5s",
) -> str:
    """deploy/nginx.conf with ``listen`` (e.g. "127.0.0.1:8443"), the replica addresses,
    and pid/log/temp files under ``workdir``."""
    text = source.read_text()
    if not _REPLICAS.search(text):
        raise ValueError("deploy/nginx.conf: no '# replicas: begin/end' block")
    servers = "".join(f"\\1server {addr} {server_params};\n" for addr in replicas)
    text = _REPLICAS.sub(servers, text, count=1)
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


def write(workdir: Path, listen: str, replicas: Sequence[str]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(render(listen, replicas, workdir))
    return conf


def check(conf: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` on a rendered file (exit 0 when nginx accepts it)."""
    return subprocess.run(
        [NGINX, "-t", "-q", "-p", str(conf.parent), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )


class Router:
    """nginx in the foreground on ``port`` of 127.0.0.1, routing to ``replicas``."""

    def __init__(self, workdir: Path, port: int, replicas: Sequence[str]) -> None:
        self.workdir = workdir
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.conf = write(workdir, self.address, replicas)
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(workdir), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
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
