"""The metrics endpoint against the real tools: ``promtool check metrics`` on its output,
``promtool check config`` on deploy/prometheus.yml, a real Prometheus server scraping a
test server (queried over its HTTP API), and the Grafana dashboard's expressions (every
metric they name is exported, and every one evaluates on that Prometheus).

Prometheus is Debian's ``prometheus`` package (``.ci/run`` installs it): without it these
tests fail rather than skip, since CI must run them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from harness.geometry import Geo
from harness.proc import stop_process
from harness.rpc import SERVICE, Driver
from harness.scrape import Samples, scrape
from harness.server import REPO, ServerProcess, free_port

from q8kv.v1 import kvcache_pb2 as pb

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "q8kv.json"
PROMETHEUS_YML = REPO / "deploy" / "prometheus.yml"
GEO = Geo(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64)
APPENDS_OK = 6  # AppendAndAttend calls that succeed in the workload
NOT_FOUND = 2


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run .ci/run (it installs it) or "
            "`apt-get install prometheus` (the Debian package has prometheus and promtool)",
            pytrace=False,
        )
    return path


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Prometheus:
    """A real Prometheus on a loopback port, scraping one target every second."""

    def __init__(self, target: str, workdir: Path) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "q8kv", "static_configs": [{"targets": [target]}]},
            ],
        }))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    _tool("prometheus"), f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> dict:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return _get_json(url)
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            return json.loads(exc.read())

    def wait_for(self, expr: str, timeout: float = 30.0) -> list:
        """The result vector of ``expr`` once it is non-empty (bounded wait)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            try:
                last = self.query(expr)
                if last["status"] == "success" and last["data"]["result"]:
                    return last["data"]["result"]
            except OSError:
                pass  # not listening yet
            time.sleep(0.25)
        raise AssertionError(
            f"{expr}: no result within {timeout}s (last: {last})\n{self.log.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        stop_process(self.proc, 15)


def workload(d: Driver) -> None:
    d.create("p", GEO)
    d.attend(d.item("p", GEO, 0, 20), d.item("p", GEO, 1, 20))
    for _ in range(APPENDS_OK - 1):
        d.attend(d.item("p", GEO, 0, 1), d.item("p", GEO, 1, 1))
    d.stub.Dequantize(pb.DequantizeRequest(session_id="p", layer=1), timeout=10)
    for _ in range(NOT_FOUND):
        d.expect_error(grpc.StatusCode.NOT_FOUND, d.stub.AppendAndAttend,
                       pb.AppendAndAttendRequest(items=[d.item("gone", GEO, 0, 1)]))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    _tool("prometheus")
    server = ServerProcess("--quant-error-sample-rate", "1")
    driver = Driver(server.address)
    prometheus = None
    try:
        workload(driver)
        text = scrape(server.metrics_url)
        prometheus = Prometheus(
            f"127.0.0.1:{server.metrics_port}", tmp_path_factory.mktemp("prometheus")
        )
        yield server, Samples(text), prometheus
    finally:
        driver.close()
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def test_promtool_check_metrics_clean(stack):
    _, samples, _ = stack
    result = subprocess.run(
        [_tool("promtool"), "check", "metrics"], input=samples.text, capture_output=True,
        text=True, timeout=30,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_promtool_check_metrics_catches_a_bad_name():
    # The check above is only worth something if promtool does complain.
    bad = "# HELP q8kv_requests Requests\n# TYPE q8kv_requests counter\nq8kv_requests 1\n"
    result = subprocess.run(
        [_tool("promtool"), "check", "metrics"], input=bad, capture_output=True, text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "_total" in result.stdout + result.stderr


def test_promtool_check_config_deploy():
    result = subprocess.run(
        [_tool("promtool"), "check", "config", str(PROMETHEUS_YML)], capture_output=True,
        text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "q8kv"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["q8kv-0:9464", "q8kv-1:9464"]


def test_real_prometheus_scrapes_the_values(stack):
    server, samples, prometheus = stack
    [ratio] = prometheus.wait_for("q8kv_cache_compression_ratio")
    assert ratio["metric"]["job"] == "q8kv"
    assert ratio["metric"]["instance"] == f"127.0.0.1:{server.metrics_port}"
    assert float(ratio["value"][1]) == pytest.approx(128 / 36, rel=1e-12)
    ok = 'grpc_server_handled_total{grpc_method="AppendAndAttend",grpc_code="OK"}'
    [handled] = prometheus.wait_for(ok)
    assert handled["metric"]["grpc_service"] == SERVICE
    assert handled["metric"]["grpc_type"] == "unary"
    assert float(handled["value"][1]) == APPENDS_OK
    errors = 'grpc_server_handled_total{grpc_method="AppendAndAttend",grpc_code="NOT_FOUND"}'
    [handled] = prometheus.wait_for(errors)
    assert float(handled["value"][1]) == NOT_FOUND
    [held] = prometheus.wait_for("q8kv_cache_bytes")
    tokens = 2 * (20 + APPENDS_OK - 1)
    assert float(held["value"][1]) == GEO.q8_bytes(tokens) == samples.get("q8kv_cache_bytes")
    [appended] = prometheus.wait_for("q8kv_tokens_appended_total")
    assert float(appended["value"][1]) == tokens


# -- the Grafana dashboard ------------------------------------------------------------------

_FUNCTION_OR_KEYWORD = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}


def dashboard_expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dash["panels"])
    return exprs


def template_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    names = set()
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        names |= set(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,", query))
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names and
    strings taken out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group() in _FUNCTION_OR_KEYWORD:
            continue
        names.add(match.group())
    return names


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_'
        'bucket{instance=~"$instance", grpc_code!="OK"}[$__rate_interval]))) / on (x) '
        "sum without (le) (q8kv_cache_bytes offset 5m) > bool 1e-3"
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "q8kv_cache_bytes"}


def test_dashboard_names_only_exported_metrics(stack):
    _, samples, _ = stack
    used = set().union(*map(metric_names, dashboard_expressions())) | template_metrics()
    missing = sorted(used - samples.names)
    assert not missing, f"dashboard metrics the server does not export: {missing}"
    # It shows every panel group: memory, compression, RPCs, kernels, batching, sessions,
    # pool and quantization error (one name from each).
    for name in (
        "q8kv_cache_bytes", "q8kv_cache_fp32_equivalent_bytes",
        "q8kv_cache_fp16_equivalent_bytes", "q8kv_cache_compression_ratio",
        "grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
        "q8kv_kernel_device_seconds_bucket", "q8kv_kernel_launch_seconds_bucket",
        "q8kv_batch_items_bucket", "q8kv_sessions_active", "q8kv_pool_used_bytes",
        "q8kv_pool_capacity_bytes", "q8kv_quantization_relative_error_bucket",
    ):
        assert name in used, name


def test_dashboard_json_and_provisioning():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    titles = [p["title"] for p in dash["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles)) >= 10
    datasource = yaml.safe_load(
        (REPO / "deploy/grafana/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]
    providers = yaml.safe_load((REPO / "deploy/grafana/dashboards/dashboards.yml").read_text())
    assert providers["providers"][0]["type"] == "file"


def test_dashboard_queries_evaluate_on_prometheus(stack):
    _, _, prometheus = stack
    # Rates need two scrapes in the window.
    prometheus.wait_for("count_over_time(q8kv_cache_bytes[30s]) >= 3")
    for expr in dashboard_expressions():
        query = expr.replace("$__rate_interval", "30s").replace("$instance", ".*")
        reply = prometheus.query(query)
        assert reply["status"] == "success", (expr, reply)
        assert reply["data"]["result"], f"no series: {expr}"
