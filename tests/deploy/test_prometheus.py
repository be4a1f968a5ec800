"""deploy/prometheus: the rules and config pass promtool, the rules' unit tests pass, and a real
Prometheus server on loopback, loaded with the shipped config and rules, scrapes a running
`pdserve local` cluster (Debian's `prometheus` package, installed by the Makefile)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_grafana import METRIC, dashboards, exported, queries
from tests.e2e.procs import WORKER_FLAGS
from tests.redis_server import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
MODEL = "qwen3-moe"
STREAMED = 3  # requests whose tokens stream (TTFT is measured on those)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (make install installs Debian's prometheus)")
    return path


def promtool(*args: str, cwd: Path = DEPLOY) -> str:
    proc = subprocess.run(
        [binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_rules_and_config_pass_promtool() -> None:
    assert "SUCCESS: 12 rules found" in promtool("check", "rules", "alerts.yml")
    assert "is valid prometheus config" in promtool("check", "config", "prometheus.yml")


def test_alert_rules_unit_tests() -> None:
    """Every alert fires on the series that should fire it, and not before (alerts_test.yml)."""
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert tested == alerts, f"alerts without a firing test: {sorted(alerts - tested)}"
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_alerts_name_exported_metrics() -> None:
    names = exported()
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        found = METRIC.findall(rule["expr"])
        assert found or "up{" in rule["expr"], rule["alert"]
        for name, _ in found:
            assert name in names, f"{rule['alert']}: {name} is not exported"


def test_worker_metrics_keep_their_names_when_prometheus_asks_for_openmetrics() -> None:
    """Prometheus asks for OpenMetrics first; a worker answers in the text format, whose
    sample names keep their `:` (prometheus-client 0.26's OpenMetrics writes `_`)."""
    from worker.metrics import WorkerMetrics

    port = WorkerMetrics("decode", "w:1", "m").serve("127.0.0.1", 0)
    accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )  # Prometheus 2.42's
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    assert 'pdserve:kv_pages_total{model_name="m",role="decode",worker="w:1"} 0.0' in text
    assert "pdserve_" not in text


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def query(prom: str, promql: str) -> list[dict[str, Any]]:
    body = get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_for(what: str, check: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def local_cluster(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """`pdserve local` (router, prefill, decode) writing its file_sd targets; (url, targets)."""
    tmp = tmp_path_factory.mktemp("pdserve-local")
    targets = tmp / "targets.json"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "local", "--model-path", str(tiny_models[MODEL]),
         "--port", str(port), "--log-dir", str(tmp / "logs"), "--metrics-targets", str(targets),
         *WORKER_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 180
        while not targets.exists():
            line = proc.stdout.readline()
            lines.append(line)
            assert line and time.monotonic() < deadline, "pdserve local did not start:\n" + "".join(
                lines
            )
        yield f"http://127.0.0.1:{port}", targets
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prometheus(
    local_cluster: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The shipped prometheus.yml and alerts.yml, aimed at the local cluster and scraping
    every second; the server's base URL."""
    url, targets = local_cluster
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["pdserve-router"]["static_configs"] = [{"targets": [url.removeprefix("http://")]}]
    # No Ray controller here: `pdserve local` writes the same targets to a file instead.
    del jobs["pdserve-controller"]
    workers = jobs["pdserve-workers"]
    del workers["http_sd_configs"]
    workers["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
    config["scrape_configs"] = list(jobs.values())
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w"),
    )  # fmt: skip
    prom = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(prom + "/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
                return False

        wait_for("Prometheus to be ready", ready)
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prometheus_scrapes_a_local_cluster(
    local_cluster: tuple[str, Path], prometheus: str
) -> None:
    url, _ = local_cluster
    prom = prometheus

    # Every target is up and scraped before the requests (so that rates see them arrive): the
    # router, one prefill and one decode worker (the router's entry in the service discovery
    # file is dropped by the workers' job).
    def all_up() -> list[dict[str, Any]] | None:
        up = query(prom, 'up{job=~"pdserve.*"} == 1')
        return up if len(up) == 3 else None

    up = wait_for("three targets up", all_up)
    assert {r["metric"]["job"] for r in up} == {"pdserve-router", "pdserve-workers"}
    assert sorted(r["metric"].get("pdserve_role", "") for r in up) == ["", "decode", "prefill"]

    for i in range(STREAMED + 1):
        body = {"model": MODEL, "prompt": f"The KV cache {i}", "max_tokens": 8, "stream": i > 0}
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            resp.read()

    # The TTFT histogram counts the streamed requests.
    ttft = wait_for(
        "the TTFT count",
        lambda: [
            r
            for r in query(prom, "sum by (model_name) (pdserve:time_to_first_token_seconds_count)")
            if float(r["value"][1]) == STREAMED
        ],
    )
    assert ttft[0]["metric"] == {"model_name": MODEL}
    # A worker's page usage, labelled by model, role and worker.
    usage = wait_for(
        "the decode worker's page usage",
        lambda: query(prom, 'pdserve:kv_page_usage_ratio{role="decode"}'),
    )
    assert len(usage) == 1
    labels = usage[0]["metric"]
    assert labels["model_name"] == MODEL and labels["worker"].startswith("127.0.0.1:")
    assert 0 <= float(usage[0]["value"][1]) < 1
    # The decode worker generated every token the router sent back.
    wait_for(
        "the worker's generated tokens to match the router's",
        lambda: query(
            prom,
            'sum(pdserve:worker_generated_tokens_total{role="decode"})'
            " == sum(pdserve:generation_tokens_total) > 0",
        ),
    )

    # Every dashboard query is valid PromQL for this server, and the overview's TTFT panel
    # has data.
    for board in dashboards().values():
        for expr in queries(board):
            if expr.startswith("label_values("):
                continue
            promql = re.sub(r"\$(model|worker|layer)", ".*", expr)
            query(prom, promql)  # a syntax error fails here
            if "time_to_first_token" in expr:
                wait_for(
                    f"data for {expr}",
                    lambda q=promql: [r for r in query(prom, q) if r["value"][1] != "NaN"],
                )

    # The shipped rules loaded and evaluate cleanly; nothing fires on a healthy cluster.
    def rules_ok() -> list[dict[str, Any]] | None:
        groups = get_json(prom + "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if len(rules) == 12 and all(r["health"] == "ok" for r in rules) else None

    wait_for("the 12 rules to evaluate cleanly", rules_ok)
    assert get_json(prom + "/api/v1/alerts")["data"]["alerts"] == []
