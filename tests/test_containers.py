"""Real containers: the project's Dockerfile and docker-compose.yml on a real Docker engine.

No registry is reachable here, so the base image is made locally: `debootstrap --variant=
minbase bookworm` -> `docker import`, with the host's CA certificates added (package
downloads inside a build go through a TLS-intercepting proxy). It is cached in the
engine under a tag that names its recipe, as is the router image (nginx from Debian on
that base); the q8kv image is rebuilt every run on Docker's layer cache.

Then `docker-compose up` of docker-compose.yml with tests/docker-compose.test.yml (numpy
backend, no GPU reservation, Prometheus/Grafana not started), the client through the
router on loopback, and `docker-compose down`, after which nothing of the project is left.
Skipped only when no Docker engine answers (deploy/ci-setup.sh installs and starts one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from harness.server import REPO, free_port
from harness.tensors import qkv
from routing import GEO, check_step

from q8kv.client import Client

OVERRIDE = REPO / "tests" / "docker-compose.test.yml"
HOST_CAS = Path("/usr/local/share/ca-certificates")
MIRROR = os.environ.get("Q8KV_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGE = "q8kv-test:latest"
LABEL = "q8kv.test=1"  # on every image this test builds, so dangling ones can be pruned
# The legacy builder: Debian's docker.io has no buildx, and the Dockerfile needs none.
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
# Pip settings the build needs to reach the index from inside a container (the host's
# file:// indexes and wheel folders are not there, so only these are passed on).
PIP_ARGS = ("PIP_INDEX_URL", "PIP_TRUSTED_HOST")

ROUTER_DOCKERFILE = """\
FROM {base}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx \\
    && rm -rf /var/lib/apt/lists/*
CMD ["nginx", "-g", "daemon off;"]
"""


def docker(*args: str, timeout: float = 600, check: bool = True, **kw) -> str:
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, env=DOCKER_ENV, **kw
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
    return proc.stdout


def engine_problem() -> str | None:
    """Why no Docker engine can be used, or None when one answers."""
    for tool in ("docker", "docker-compose", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (deploy/ci-setup.sh installs it)"
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True, text=True, timeout=30, env=DOCKER_ENV,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer `docker info` within 30 s"
    if proc.returncode != 0:
        return f"no Docker engine (deploy/ci-setup.sh starts dockerd): {proc.stderr.strip()}"
    return None


_PROBLEM = engine_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def image_exists(tag: str) -> bool:
    proc = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, env=DOCKER_ENV)
    return proc.returncode == 0


def recipe_tag(name: str, *parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return f"{name}:{h.hexdigest()[:12]}"


def host_cas() -> list[Path]:
    return sorted(HOST_CAS.rglob("*.crt")) if HOST_CAS.is_dir() else []


def base_image() -> str:
    """Debian bookworm minbase + the host's CAs, imported; reused while its recipe holds."""
    tag = recipe_tag(
        "q8kv-test-base", "bookworm minbase ca-certificates v1", MIRROR,
        *(ca.read_bytes() for ca in host_cas()),
    )  # fmt: skip
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="q8kv-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=ca-certificates",
             "bookworm", str(rootfs), MIRROR],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        dest = rootfs / "usr/local/share/ca-certificates"
        dest.mkdir(parents=True, exist_ok=True)
        for ca in host_cas():
            shutil.copy(ca, dest / ca.name)
        subprocess.run(
            ["chroot", str(rootfs), "update-ca-certificates"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        # Downloaded .debs and package lists: dead weight in an image.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        docker("import", "--change", 'CMD ["bash"]', "-", tag, stdin=tar.stdout)
        assert tar.wait() == 0
    return tag


def router_image(base: str) -> str:
    dockerfile = ROUTER_DOCKERFILE.format(base=base)
    tag = recipe_tag("q8kv-test-router", dockerfile)
    if not image_exists(tag):
        docker("build", "-q", "--label", LABEL, "-t", tag, "-", input=dockerfile, timeout=900)
    return tag


def q8kv_image(base: str) -> str:
    """The project's Dockerfile, CPU-only (no CuPy), on the local base."""
    args = ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", "Q8KV_EXTRAS="]
    # The base image trusts the host's CAs in the system bundle; pip must use that bundle.
    args += ["--build-arg", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt"]
    args += [f"--build-arg={k}={os.environ[k]}" for k in PIP_ARGS if os.environ.get(k)]
    docker("build", "-q", "--label", LABEL, "-t", IMAGE, *args, str(REPO), timeout=1200)
    # A rebuild leaves the previous q8kv-test image untagged: don't let them pile up.
    docker("image", "prune", "-f", "--filter", f"label={LABEL}", check=False)
    return IMAGE


class Stack:
    """docker-compose with the project's file + the test override, as one merged file."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.project = f"q8kvtest{uuid.uuid4().hex[:8]}"
        self.env = {**DOCKER_ENV, **env}
        merged = yaml.safe_load(
            self.compose("-f", "docker-compose.yml", "-f", str(OVERRIDE), "config", cwd=REPO)
        )
        # No GPU here, and an override cannot delete the reservation in docker-compose 1.29.
        for service in merged["services"].values():
            service.pop("deploy", None)
        self.file = workdir / "docker-compose.merged.yml"
        self.file.write_text(yaml.safe_dump(merged))

    def compose(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> str:
        proc = subprocess.run(
            ["docker-compose", "-p", self.project, *args],
            capture_output=True, text=True, timeout=timeout, env=self.env, cwd=cwd,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        return proc.stdout

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return self.compose(
            "-f", str(self.file), "--project-directory", str(REPO), *args, timeout=timeout
        )

    def container(self, service: str) -> str:
        return self("ps", "-q", service).strip()

    def health(self, service: str) -> str:
        return docker(
            "inspect", "--format", "{{.State.Status}}/{{.State.Health.Status}}",
            self.container(service),
        ).strip()  # fmt: skip

    def leftovers(self) -> dict[str, str]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            kind: out
            for kind, out in (
                ("containers", docker("ps", "-aq", "--filter", label)),
                ("networks", docker("network", "ls", "-q", "--filter", label)),
                ("volumes", docker("volume", "ls", "-q", "--filter", label)),
            )
            if out.strip()
        }


def session_ids_on(stack: Stack, service: str) -> set[str]:
    """The sessions a replica holds, from its own ListSessions inside its container."""
    code = (
        "import json; from q8kv.client import Client; "
        "print(json.dumps([s.id for s in Client('127.0.0.1:50051').list_sessions()]))"
    )
    return set(json.loads(docker("exec", stack.container(service), "python", "-c", code)))


def test_compose_stack_routes_sessions_and_goes_healthy(tmp_path):
    t0 = time.monotonic()
    base = base_image()
    router = router_image(base)
    image = q8kv_image(base)
    built = time.monotonic() - t0

    port = free_port()
    stack = Stack(
        tmp_path,
        {
            "Q8KV_IMAGE": image,
            "Q8KV_ROUTER_IMAGE": router,
            "Q8KV_ROUTER_BIND": "127.0.0.1",
            "Q8KV_ROUTER_PORT": str(port),
        },
    )
    services = ("q8kv-0", "q8kv-1", "router")
    try:
        # docker-compose starts the router only once both replicas report healthy.
        stack("up", "-d", "--no-build")
        deadline = time.monotonic() + 120
        while (states := {s: stack.health(s) for s in services}) != dict.fromkeys(
            services, "running/healthy"
        ):
            assert time.monotonic() < deadline, f"not healthy: {states}\n{stack('logs')}"
            time.sleep(0.5)

        rng = np.random.default_rng(11)
        sent: dict[str, list[np.ndarray]] = {}
        with Client(f"127.0.0.1:{port}", timeout=20, wait_for_ready=True) as client:
            sessions = [client.create_session(**GEO) for _ in range(16)]
            for n in (4, 1):
                for s in sessions:
                    check_step(s, 0, *qkv(rng, n, GEO), sent.setdefault(s.id, []))
        held = [session_ids_on(stack, s) for s in ("q8kv-0", "q8kv-1")]
        assert not held[0] & held[1]
        assert held[0] | held[1] == {s.id for s in sessions}
        assert held[0] and held[1], [len(h) for h in held]
        # The image runs as its non-root user.
        assert docker("exec", stack.container("q8kv-0"), "id", "-u").strip() == "10001"
    finally:
        stack("down", "-v", "--remove-orphans", "--timeout", "10")
    assert stack.leftovers() == {}
    print(f"images ready in {built:.1f}s, whole test {time.monotonic() - t0:.1f}s")
