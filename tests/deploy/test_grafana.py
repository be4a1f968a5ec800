"""deploy/grafana: the dashboards are their generator's output, carry the fields Grafana's
dashboard schema requires, and every query names metrics (and labels) the code exports."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from prometheus_client.metrics import MetricWrapperBase

from cluster.metrics import GroupSample
from cluster.metrics import app as controller_app
from router.metrics import RouterMetrics, WorkerSample
from worker.metrics import WorkerMetrics

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
METRIC = re.compile(r"(pdserve:[A-Za-z0-9_:]+)(\{[^}]*\})?")
LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")

# What Grafana's dashboard schema (the JSON model Grafana 10/11 imports) requires of a
# dashboard, its variables and panels, and of a Prometheus query.
DATASOURCE = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}},
}
SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time", "editable",
                 "graphTooltip", "version", "tags", "annotations"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": {
                "type": "object", "required": ["name", "type"],
                "properties": {"type": {"enum": ["datasource", "query", "custom", "constant"]}},
            }}},
        },
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos", "datasource", "targets"],
            "properties": {
                "id": {"type": "integer"},
                "type": {"enum": ["timeseries", "stat", "heatmap", "state-timeline", "gauge"]},
                "datasource": DATASOURCE,
                "gridPos": {
                    "type": "object", "required": ["h", "w", "x", "y"],
                    "properties": {k: {"type": "integer", "minimum": 0} for k in "hwxy"},
                },
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["refId", "expr", "datasource"],
                    "properties": {"expr": {"type": "string", "minLength": 1},
                                   "datasource": DATASOURCE},
                }},
            },
        }},
    },
}  # fmt: skip


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {f.stem: json.loads(f.read_text()) for f in sorted(GRAFANA.glob("*.json"))}


def queries(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def exported() -> dict[str, set[str]]:
    """Every sample name the code exports, with its label names."""
    router = RouterMetrics()
    router.set_model("m")
    router.registry_up()  # exported by a router that polls a Redis registry
    router.watch_workers(lambda: [WorkerSample("w:1", "decode", True, 0, False, 0, 1, 2, 3, 4)])
    worker = WorkerMetrics("decode", "w:1", "m")
    for metrics in (router, worker):  # a child of each labelled metric, so that it has samples
        for m in vars(metrics).values():
            if isinstance(m, MetricWrapperBase) and m._labelnames and not m._labelvalues:
                m.labels(*("x" for _ in m._labelnames))
    texts = [router.render().decode(), worker_text(worker), controller_text()]
    names: dict[str, set[str]] = {}
    for text in texts:
        for line in text.splitlines():
            if line.startswith("#") or not line:
                continue
            match = METRIC.match(line)
            assert match is not None, line
            labels = set(LABEL.findall(match.group(2) or ""))
            names.setdefault(match.group(1), set()).update(labels - {"le"})
    return names


def worker_text(worker: WorkerMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(worker.registry).decode()


def controller_text() -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from cluster.metrics import _GroupCollector

    registry = CollectorRegistry()
    registry.register(
        _GroupCollector(lambda: [GroupSample("prefill-0", "prefill", 1, True, False)])
    )
    return generate_latest(registry).decode()


def test_the_files_are_the_generators_output() -> None:
    gen = generator()
    assert set(dashboards()) == set(gen.DASHBOARDS)
    for uid in gen.DASHBOARDS:
        assert (GRAFANA / f"{uid}.json").read_text() == gen.render(uid), (
            f"{uid}.json is stale: run python deploy/grafana/dashboards.py"
        )
    assert controller_app(list)  # the controller's app builds (its metrics are read above)


@pytest.mark.parametrize("uid", sorted(dashboards()))
def test_dashboard_schema_and_layout(uid: str) -> None:
    board = dashboards()[uid]
    jsonschema.validate(board, SCHEMA)
    assert board["uid"] == uid
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    ids = [panel["id"] for panel in board["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
    for expr in queries(board):  # every $variable a query uses is defined
        used = set(re.findall(r"\$(\w+)", expr)) - {"__all", "__rate_interval", "__interval"}
        assert used <= variables, (expr, used - variables)


@pytest.mark.parametrize("uid", sorted(dashboards()))
def test_every_query_names_exported_metrics(uid: str) -> None:
    names = exported()
    for expr in queries(dashboards()[uid]):
        found = METRIC.findall(expr)
        assert found, f"no pdserve metric in {expr!r}"
        assert "pdserve_" not in expr, expr
        for name, selector in found:
            assert name in names, f"{name} (in {expr!r}) is not exported"
            used = set(LABEL.findall(selector)) - {"__name__"}
            assert used <= names[name], f"{name} has no label {used - names[name]}: {expr!r}"
        for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {x.strip() for x in grouping.split(",")} - {"le"}
            assert any(labels <= names[n] for n, _ in found), (expr, labels)
