"""The deployment files as their own tools read them: docker-compose (1.29, and Compose v2
where installed) accepts docker-compose.yml, nginx accepts the router config, promtool
accepts the Prometheus config. Plus the properties the rest of the deployment relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import routing
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
OVERRIDE = REPO / "tests" / "docker-compose.test.yml"
REPLICAS = ("q8kv-0", "q8kv-1")
# Four replicas on one GPU: docker-compose.yml + deploy/replicas-4/compose.yml.
FOUR = REPO / "deploy" / "replicas-4"
FOUR_REPLICAS = tuple(f"q8kv-{i}" for i in range(4))
FOUR_ARGS = ("--env-file", str(FOUR / "one-gpu.env"), "-f", "docker-compose.yml",
             "-f", str(FOUR / "compose.yml"))


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, **(env or {})}
    )


def compose_commands() -> list[list[str]]:
    """docker-compose 1.29 (Debian's) and Compose v2 (`docker compose`), those present."""
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker") and run("docker", "compose", "version").returncode == 0:
        found.append(["docker", "compose"])
    return found


@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.yml", str(OVERRIDE))])
def test_compose_file_is_accepted(files):
    commands = compose_commands()
    if not commands:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    for cmd in commands:
        flags = [arg for f in files for arg in ("-f", f)]
        proc = run(*cmd, *flags, "config", "-q")
        assert proc.returncode == 0, f"{' '.join(cmd)} config: {proc.stderr}"


def test_four_replica_compose_is_accepted():
    commands = compose_commands()
    if not commands:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    for cmd in commands:
        proc = run(*cmd, *FOUR_ARGS, "config", "-q", env={"Q8KV_MEMORY_BUDGET": "30GiB"})
        assert proc.returncode == 0, f"{' '.join(cmd)} config: {proc.stderr}"
        # Replicas sharing a GPU must not each take `auto` (90% of it): no budget, no stack.
        env = {k: v for k, v in os.environ.items() if k != "Q8KV_MEMORY_BUDGET"}
        proc = subprocess.run([*cmd, *FOUR_ARGS, "config", "-q"], capture_output=True,
                              text=True, timeout=60, cwd=REPO, env=env)
        assert proc.returncode != 0 and "Q8KV_MEMORY_BUDGET" in proc.stderr, proc.stderr


def _merged_four() -> dict:
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed")
    proc = run("docker-compose", *FOUR_ARGS, "config", env={"Q8KV_MEMORY_BUDGET": "30GiB"})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["services"]


def test_four_replicas_share_gpu_zero_with_a_quarter_each():
    """The merged four-replica stack: four replicas alike but for name, volumes and GPU,
    all on GPU 0 with the budget given, own snapshot volumes; the router and Prometheus
    use the four-replica configs and the router waits for all four."""
    services = _merged_four()
    assert tuple(sorted(s for s in services if s.startswith("q8kv-"))) == FOUR_REPLICAS
    own = ("hostname", "volumes", "deploy")
    alike = [{k: v for k, v in services[name].items() if k not in own} for name in FOUR_REPLICAS]
    assert all(a == alike[0] for a in alike), "replicas differ beyond name, volumes and GPU"
    assert alike[0]["environment"]["Q8KV_MEMORY_BUDGET"] == "30GiB"
    snapshots = set()
    for name in FOUR_REPLICAS:
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == ["0"], (name, device)
        snapshots |= {v for v in services[name]["volumes"] if "/var/lib/q8kv/snapshots" in v}
    assert len(snapshots) == len(FOUR_REPLICAS), snapshots
    router = services["router"]
    (mount,) = router["volumes"]
    assert mount.endswith("deploy/replicas-4/nginx.conf:/etc/nginx/nginx.conf:ro"), mount
    assert {n: d["condition"] for n, d in router["depends_on"].items()} == dict.fromkeys(
        FOUR_REPLICAS, "service_healthy"
    )
    assert any(v.endswith("deploy/replicas-4/prometheus.yml:/etc/prometheus/prometheus.yml:ro")
               for v in services["prometheus"]["volumes"])


def test_four_replica_router_config_is_the_base_one_with_four_servers(tmp_path):
    """deploy/replicas-4/nginx.conf differs from deploy/nginx.conf only in its header
    comment and its replica list, and nginx accepts it."""
    base = routing.NGINX_CONF.read_text()
    four = (FOUR / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server (\S+) max_fails=1 fail_timeout=5s;", four, re.M)
    assert servers == [f"{name}:50051" for name in FOUR_REPLICAS]
    body = [routing.with_replicas(text.split("\n\n", 1)[1], ["x:1"]) for text in (base, four)]
    assert body[0] == body[1], "deploy/replicas-4/nginx.conf drifted from deploy/nginx.conf"
    if routing.NGINX is not None:
        conf = tmp_path / "nginx.conf"
        addresses = [f"127.0.0.1:{50001 + i}" for i in range(4)]
        conf.write_text(routing.render("127.0.0.1:50999", addresses, tmp_path, FOUR / "nginx.conf"))
        proc = routing.check(conf)
        assert proc.returncode == 0, proc.stderr


def test_four_replica_prometheus_config_is_the_base_one_with_four_targets():
    base = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    four = yaml.safe_load((FOUR / "prometheus.yml").read_text())
    base["scrape_configs"][0]["static_configs"][0]["targets"] = [
        f"{name}:9464" for name in FOUR_REPLICAS
    ]
    assert four == base


def test_compose_topology():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"router", "prometheus", "grafana", *REPLICAS} <= services.keys()
    gpus = []
    for name in REPLICAS:
        svc = services[name]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus.append(device["device_ids"][0])
        assert "healthcheck" in svc
        assert any(v.endswith(":/var/lib/q8kv/cupy-cache") for v in svc["volumes"])
        assert any(v.endswith(":/var/lib/q8kv/snapshots") for v in svc["volumes"])
    assert len(set(gpus)) == len(REPLICAS), f"replicas share a GPU: {gpus}"
    router = services["router"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in router["volumes"]
    for name in REPLICAS:
        assert router["depends_on"][name]["condition"] == "service_healthy"
    assert any("deploy/prometheus.yml" in v for v in services["prometheus"]["volumes"])
    assert any(v.startswith("./deploy/grafana:") for v in services["grafana"]["volumes"])


def test_router_config_routes_by_session_header():
    text = routing.NGINX_CONF.read_text()
    assert re.search(r"^\s*hash \$http_x_session_id consistent;", text, re.M)
    assert re.search(r"^\s*grpc_pass grpc://q8kv;", text, re.M)
    assert re.search(r"^\s*listen 50051 http2;", text, re.M)
    for name in REPLICAS:
        assert re.search(rf"^\s*server {name}:50051\b", text, re.M)
    # The client sends this header on every per-session call.
    from q8kv.client.channel import SESSION_HEADER

    assert SESSION_HEADER == "x-session-id"


@pytest.mark.skipif(routing.NGINX is None, reason="nginx is not installed")
def test_nginx_accepts_rendered_router_config(tmp_path):
    conf = routing.write(tmp_path, "127.0.0.1:50999", ["127.0.0.1:50001", "127.0.0.1:50002"])
    proc = routing.check(conf)
    assert proc.returncode == 0, proc.stderr
    rendered = conf.read_text()
    assert "server 127.0.0.1:50001 " in rendered and "q8kv-0" not in rendered


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_prometheus_config():
    proc = run("promtool", "check", "config", "deploy/prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = {
        t for job in spec["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert {f"{name}:9464" for name in REPLICAS} <= targets


def test_dockerfile_essentials():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:12\.\S+-runtime-", text, re.M)
    assert re.search(r"^ARG Q8KV_EXTRAS=gpu$", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "not multi-stage"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    assert re.search(r"^EXPOSE 50051 9464$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*python -m q8kv\.client\.health", text, re.M)
    assert "CUPY_CACHE_DIR=/var/lib/q8kv/cupy-cache" in text
    assert re.search(r'^VOLUME \["/var/lib/q8kv/cupy-cache"\]', text, re.M)
