"""bench.serving_pd: its generated tokenizer (every id a dummy model can sample decodes to
text), and the TTFT phases it scrapes from each process's /metrics around a run."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from bench.serving_pd import (
    PHASE_HISTOGRAMS,
    histogram_totals,
    phase_means_ms,
    phase_probe,
    phase_table,
    ttft_target_table,
    write_word_tokenizer,
)


def test_every_id_of_the_vocabulary_decodes_to_a_word_that_encodes_back(tmp_path: Path) -> None:
    write_word_tokenizer(tmp_path, 128256)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 128256
    ids = [0, 1, 4095, 128000, 128255]
    text = tok.decode(ids)
    assert text == "w0 w1 w4095 w128000 w128255"
    assert tok.encode(text).ids == ids
    assert (tmp_path / "tokenizer_config.json").exists()


def metrics_text(queue_sum: float, queue_count: int, write_sum: float, write_count: int) -> str:
    """A made-up /metrics page: two label sets of a phase histogram, the KV write, a counter."""
    labels = 'model_name="m",role="prefill"'
    lines = []
    for name, total, count in (
        ("pdserve:prefill_queue_seconds", queue_sum, queue_count),
        ("pdserve:kv_transfer_latency_seconds", write_sum, write_count),
    ):
        lines.append(f"# HELP {name} x\n# TYPE {name} histogram")
        for worker, share in (("a:1", 0.25), ("b:2", 0.75)):  # two workers' label sets
            lab = f'{labels},worker="{worker}"'
            lines.append(f'{name}_bucket{{{lab},le="+Inf"}} {count * share}')
            lines.append(f"{name}_sum{{{lab}}} {total * share}")
            lines.append(f"{name}_count{{{lab}}} {count * share}")
    lines += ["# HELP pdserve:kv_transfer_bytes x", "# TYPE pdserve:kv_transfer_bytes counter",
              f'pdserve:kv_transfer_bytes_total{{{labels},worker="a:1"}} 7.0']  # fmt: skip
    return "\n".join(lines) + "\n"


def test_histogram_totals_add_label_sets_and_skip_other_types() -> None:
    totals = histogram_totals(metrics_text(0.4, 8, 0.2, 4))
    assert totals == {
        "pdserve:prefill_queue_seconds": (0.4, 8.0),
        "pdserve:kv_transfer_latency_seconds": (0.2, 4.0),
    }


def test_phase_means_are_sum_deltas_over_count_deltas_in_ms() -> None:
    before = histogram_totals(metrics_text(0.4, 8, 0.2, 4))
    after = histogram_totals(metrics_text(0.5, 12, 0.2, 4))
    means = phase_means_ms(before, after)
    assert list(means) == list(PHASE_HISTOGRAMS)
    assert means["prefill_queue"] == pytest.approx(25.0)  # 0.1 s over 4 requests
    assert means["kv_write"] is None  # nothing observed during the run
    assert means["decode_pickup"] is None  # not exported at all


def test_phase_probe_scrapes_around_a_run_and_the_table_shows_it() -> None:
    pages = [metrics_text(0.4, 8, 0.2, 4), metrics_text(0.5, 12, 0.26, 8)]

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages[0].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        finish = phase_probe([url])()
        pages.pop(0)  # the run happens
        phases = finish()["phases_ms"]
        nobody = phase_probe(["http://127.0.0.1:1/metrics"])()()
    finally:
        server.shutdown()
        server.server_close()
    assert phases["prefill_queue"] == pytest.approx(25.0)
    assert phases["kv_write"] == pytest.approx(15.0)  # 0.06 s over 4 writes
    assert nobody == {"phases_ms": None}  # an unreachable process: the run goes on without
    run = {"request_rate": 2.0, "ttft_ms": {"p50": 40.0}, "phases_ms": phases}
    table = phase_table({"disaggregated": [run]})
    assert "| disaggregated | 2 | 40.0 | 25.00 | - | - | 15.00 |" in table


def test_ttft_target_table_sets_disaggregated_against_colocated_plus_the_handoff() -> None:
    """Per rate: colocated TTFT p50 plus the hand-off phases' means, plus 10%, against the
    disaggregated p50; a rate without scraped phases is left out, one mode alone gives none."""

    def run(rate: float, p50: float, phases: dict[str, float] | None = None) -> dict[str, Any]:
        return {"request_rate": rate, "ttft_ms": {"p50": p50}, "phases_ms": phases}

    handoff = {"handoff_wait": 0.5, "kv_write": 2.0, "transfer_done": 1.5}  # 4.0 ms
    results = {
        "colocated": [run(2.0, 30.0), run(4.0, 36.0), run(8.0, 40.0)],
        "disaggregated": [run(2.0, 37.4, handoff), run(4.0, 44.1, handoff), run(8.0, 50.0)],
    }
    table = ttft_target_table(results)
    assert "| 2 | 30.0 | 4.00 | 37.4 | 37.4 | yes |" in table  # (30 + 4) x 1.1
    assert "| 4 | 36.0 | 4.00 | 44.0 | 44.1 | no |" in table
    assert "| 8 |" not in table  # no phases scraped there
    assert ttft_target_table({"disaggregated": results["disaggregated"]}) == ""
