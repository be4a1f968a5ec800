"""Writes the Grafana dashboards in this folder: `python deploy/grafana/dashboards.py`.

The JSON files are what Grafana imports (or what deploy/k8s provisions); this script is where
they are edited, so that every panel shares one layout, one datasource variable and one model
filter. tests/deploy/test_grafana.py checks that the files are this script's output and that
every query names a metric the code exports.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model"'  # every query is filtered by the model variable


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | heatmap | state-timeline
    width: int = 12
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def p(title: str, *queries: tuple[str, str], **kw: Any) -> Panel:
    return Panel(title, queries, **kw)


def quantiles(metric: str, by: str = "") -> tuple[tuple[str, str], ...]:
    """p50, p90 and p99 of a histogram, over 1-minute rates."""
    group = f"le{', ' + by if by else ''}"
    legend = f"{{{{{by}}}}} " if by else ""
    return tuple(
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{M}}}[1m])))",
            f"{legend}p{int(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    )


OVERVIEW = (
    "pdserve overview",
    "Requests, latency, errors and throughput as the router sees them.",
    [
        p("Requests / s by status", (
            f"sum by (status) (rate(pdserve:router_requests_total{{{M}}}[1m]))", "{{status}}"),
          unit="reqps"),
        p("Errors / s (4xx and 5xx)", (
            f'sum by (endpoint, status) (rate(pdserve:router_requests_total{{{M},status=~"[45].."}}'
            "[1m]))", "{{endpoint}} {{status}}"),
          (f"sum by (reason) (rate(pdserve:router_rejected_requests_total{{{M}}}[1m]))",
           "429 {{reason}}"), unit="reqps"),
        p("Time to first token", *quantiles("pdserve:time_to_first_token_seconds"), unit="s"),
        p("Inter-token latency", *quantiles("pdserve:inter_token_latency_seconds"), unit="s"),
        p("End-to-end request latency", *quantiles("pdserve:e2e_request_latency_seconds"),
          unit="s"),
        p("Token throughput", (
            f"sum(rate(pdserve:prompt_tokens_total{{{M}}}[1m]))", "prompt tokens / s"),
          (f"sum(rate(pdserve:generation_tokens_total{{{M}}}[1m]))", "generated tokens / s"),
          unit="short"),
        p("Requests running and queued in the router", (
            f"sum(pdserve:router_running_requests{{{M}}})", "running"),
          (f"sum(pdserve:router_queue_depth{{{M}}})", "queued"), unit="short"),
        p("KV pool usage", (
            f"max by (role) (pdserve:kv_page_usage_ratio{{{M}}})", "max {{role}}"),
          unit="percentunit"),
    ],
)  # fmt: skip

PD = (
    "pdserve prefill, decode and KV transfer",
    "The workers of both roles and the KV hand-off between them.",
    [
        p("Running requests", (
            f"pdserve:worker_running_requests{{{M}}}", "{{role}} {{worker}}")),
        p("Waiting requests", (
            f"pdserve:worker_waiting_requests{{{M}}}", "{{role}} {{worker}}")),
        p("Prefill hand-off queues", (
            f"sum by (worker) (pdserve:prefill_bootstrap_queue_requests{{{M}}})",
            "bootstrap {{worker}}"),
          (f"sum by (worker) (pdserve:prefill_inflight_queue_requests{{{M}}})",
           "in flight {{worker}}"),
          description="Bootstrap: prefilled, waiting for the decode worker's destination. "
                      "In flight: KV pages being written."),
        p("Decode hand-off queues", (
            f"sum by (worker) (pdserve:decode_prealloc_queue_requests{{{M}}})",
            "prealloc {{worker}}"),
          (f"sum by (worker) (pdserve:decode_transfer_queue_requests{{{M}}})",
           "transfer {{worker}}"),
          description="Prealloc: reserving pages and bootstrapping. Transfer: pages reserved, "
                      "waiting for the KV."),
        p("KV pool usage", (f"pdserve:kv_page_usage_ratio{{{M}}}", "{{role}} {{worker}}"),
          unit="percentunit"),
        p("Prefix-cache hit rate", (
            f"sum by (worker) (rate(pdserve:prefix_cache_hit_tokens_total{{{M}}}[5m])) / "
            f"sum by (worker) (rate(pdserve:prefix_cache_query_tokens_total{{{M}}}[5m]))",
            "{{worker}}"), unit="percentunit"),
        p("Generation throughput", (
            f"pdserve:gen_throughput{{{M}}}", "{{worker}}"), unit="short",
          description="Tokens per second each decode (or colocated) worker generates."),
        p("Preemptions / s", (
            f"rate(pdserve:num_preemptions_total{{{M}}}[1m])", "{{worker}}"), unit="short"),
        p("KV transfer speed", (
            f"pdserve:kv_transfer_speed_gb_s{{{M}}}", "latest {{worker}}"),
          (f"sum by (worker) (rate(pdserve:kv_transfer_bytes_total{{{M}}}[1m])) / "
           f"sum by (worker) (rate(pdserve:kv_transfer_latency_seconds_sum{{{M}}}[1m])) / 1e9",
           "mean {{worker}}"), unit="GBs"),
        p("KV transfer latency", *quantiles("pdserve:kv_transfer_latency_seconds"), unit="s"),
        p("Time to first token by phase (mean)", *(
            (f"sum(rate(pdserve:{name}_seconds_sum{{{M}}}[5m])) / "
             f"sum(rate(pdserve:{name}_seconds_count{{{M}}}[5m]))", legend)
            for name, legend in (
                ("prefill_queue", "prefill: queue"),
                ("prefill_compute", "prefill: compute to first token"),
                ("prefill_handoff_wait", "prefill: wait for the destination"),
                ("kv_transfer_latency", "prefill: KV write"),
                ("prefill_transfer_done", "prefill: TransferDone"),
                ("decode_bootstrap", "decode: bootstrap"),
                ("decode_kv_wait", "decode: wait for the KV"),
                ("decode_engine_pickup", "decode: engine pickup"),
            )), unit="s",
          description="Where a disaggregated request's time to first token goes, each phase's "
                      "mean over 5 minutes (the decode side's phases overlap the prefill's)."),
        p("KV bytes written / s", (
            f"sum by (worker) (rate(pdserve:kv_transfer_bytes_total{{{M}}}[1m]))", "{{worker}}"),
          unit="Bps"),
        p("Failed transfers and bootstraps / s", (
            f"sum by (role, worker) (rate(pdserve:kv_transfer_failures_total{{{M}}}[5m]))",
            "transfer {{role}} {{worker}}"),
          (f"sum by (role, worker) (rate(pdserve:kv_bootstrap_failures_total{{{M}}}[5m]))",
           "bootstrap {{role}} {{worker}}"), unit="short"),
    ],
)  # fmt: skip

EP = (
    "pdserve expert parallelism",
    "Expert load per MoE layer, the imbalance EPLB works on, and its moves.",
    [
        p("Expert load (tokens routed since the last rebalance)", (
            f'sum by (expert) (pdserve:expert_load{{{M},worker=~"$worker",layer=~"$layer"}})',
            "{{expert}}"), kind="heatmap", width=24,
          description="One row per logical expert of the chosen layers; hot rows are the "
                      "experts that EPLB replicates.",
          options={"calculate": False, "yAxis": {"axisPlacement": "left"},
                   "rowsFrame": {"layout": "auto"}, "color": {"scheme": "Oranges"}}),
        p("Imbalance per layer (max / mean rank load)", (
            f'pdserve:expert_load_imbalance{{{M},worker=~"$worker",layer=~"$layer"}}',
            "{{layer}}"), unit="short",
          description="1.0 is perfectly balanced; the step time follows the busiest rank."),
        p("EPLB moves", (
            f'increase(pdserve:eplb_rebalances_total{{{M},worker=~"$worker"}}[10m])',
            "{{worker}}"), unit="short",
          description="Layer re-placements applied in the last 10 minutes."),
    ],
)  # fmt: skip

ROUTER = (
    "pdserve router and workers",
    "Worker health as the router sees it, its circuit breakers, retries and migrations.",
    [
        p("Worker health", (
            f"pdserve:router_worker_healthy{{{M}}}", "{{role}} {{worker}}"),
          kind="state-timeline", width=24,
          options={"mappings": [{"type": "value", "options": {
              "0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}]}),
        p("Circuit breaker state", (
            f"pdserve:router_worker_circuit_state{{{M}}}", "{{role}} {{worker}}"),
          kind="state-timeline", width=24,
          options={"mappings": [{"type": "value", "options": {
              "0": {"text": "closed", "color": "green"},
              "1": {"text": "half-open", "color": "yellow"},
              "2": {"text": "open", "color": "red"}}}]}),
        p("In-flight requests per worker", (
            f"pdserve:router_worker_in_flight_requests{{{M}}}", "{{role}} {{worker}}")),
        p("Worker queue (last load report)", (
            f"pdserve:router_worker_waiting_requests{{{M}}}", "waiting {{worker}}"),
          (f"pdserve:router_worker_running_requests{{{M}}}", "running {{worker}}")),
        p("Retries and migrations / s", (
            f"sum by (code) (rate(pdserve:router_retries_total{{{M}}}[1m]))", "retry {{code}}"),
          (f"sum by (code) (rate(pdserve:router_migrations_total{{{M}}}[1m]))",
           "migration {{code}}")),
        p("Worker errors / s", (
            f"sum by (worker, code) (rate(pdserve:router_worker_errors_total{{{M}}}[1m]))",
            "{{worker}} {{code}}")),
        p("Requests per worker (policy decisions / s)", (
            f"sum by (role, worker) (rate(pdserve:router_policy_decisions_total{{{M}}}[1m]))",
            "{{role}} {{worker}}")),
        p("Router queue and refusals", (
            f"sum(pdserve:router_queue_depth{{{M}}})", "queued"),
          (f"sum by (reason) (rate(pdserve:router_rejected_requests_total{{{M}}}[1m]))",
           "refused/s {{reason}}")),
        p("Draining workers", (
            f"pdserve:router_worker_draining{{{M}}}", "{{role}} {{worker}}")),
        p("Registry and pool membership", (
            f"min(pdserve:router_registry_up{{{M}}})", "registry up"),
          (f"sum by (change) (increase(pdserve:router_worker_membership_changes_total"
           f"{{{M}}}[10m]))", "{{change}} / 10 min")),
        p("Worker restarts (Ray controller)", (
            "increase(pdserve:worker_restarts_total[1h])", "{{group}}"),
          description="The controller's count: not labelled by model."),
        p("Groups healthy (Ray controller)", (
            "pdserve:cluster_group_healthy", "{{group}}")),
    ],
)  # fmt: skip

DASHBOARDS = {
    "pdserve-overview": OVERVIEW,
    "pdserve-pd-transfer": PD,
    "pdserve-expert-parallel": EP,
    "pdserve-router-workers": ROUTER,
}


def _variable(name: str, label: str, metric: str, all_value: bool = True) -> dict[str, Any]:
    query = f"label_values({metric}, {name if name != 'model' else 'model_name'})"
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": "StandardVariableQuery"}, "definition": query,
        "refresh": 2, "includeAll": all_value, "multi": True, "allValue": ".*",
        "current": {"text": "All", "value": "$__all"}, "sort": 1,
    }  # fmt: skip


def _panel(index: int, panel: Panel, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DS,
                "expr": expr,
                "legendFormat": legend,
                "range": True,
                "instant": False,
            }
            for i, (expr, legend) in enumerate(panel.queries)
        ],
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
    }
    mappings = panel.options.get("mappings")
    if mappings is not None:
        out["fieldConfig"]["defaults"]["mappings"] = mappings
        out["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
    else:
        out["options"].update(panel.options)
    return out


def dashboard(uid: str) -> dict[str, Any]:
    title, description, panels = DASHBOARDS[uid]
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
        _variable("model", "Model", "pdserve:router_requests_total"),
    ]  # fmt: skip
    if uid == "pdserve-expert-parallel":
        variables += [
            _variable("worker", "Decode instance", "pdserve:expert_load_imbalance"),
            _variable("layer", "MoE layer", "pdserve:expert_load_imbalance"),
        ]
    laid_out, x, y = [], 0, 0
    for i, panel in enumerate(panels):
        if x + panel.width > 24:
            x, y = 0, y + 8
        laid_out.append(_panel(i, panel, x, y))
        x += panel.width
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["pdserve"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [
            {
                "title": "pdserve dashboards",
                "type": "dashboards",
                "tags": ["pdserve"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": variables},
        "panels": laid_out,
    }


def render(uid: str) -> str:
    return json.dumps(dashboard(uid), indent=2) + "\n"


def main() -> int:
    for uid in DASHBOARDS:
        (HERE / f"{uid}.json").write_text(render(uid))
    print(f"wrote {len(DASHBOARDS)} dashboards to {HERE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
