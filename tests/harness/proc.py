"""Child processes and what /proc says about them."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process(proc: subprocess.Popen, timeout: float = 30.0, sig: int = signal.SIGTERM):
    """Send ``sig`` to a running ``proc``, kill it after ``timeout`` s; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def rss_bytes(pid: int) -> int:
    return status_kib(pid, "VmRSS") * 1024


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM (the peak RSS) over from the current RSS (proc(5): clear_refs '5')."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on: its socket inodes matched against /proc/net/tcp*."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports
