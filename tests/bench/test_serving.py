"""bench.serving: its statistics on made-up timings, its seeded datasets, and one short run
against a real `pdserve local` (router, prefill and decode workers) on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import serving
from bench.serving import SLO, RequestResult, TextSource
from cluster.local import LocalCluster, LocalClusterSpec
from engine.cli import default_model_dir
from tests.e2e.procs import WORKER_FLAGS
from tests.redis_server import free_port


def result(ttft: float, e2e: float, output_len: int, itls: list[float] | None = None,
           prompt_len: int = 10) -> RequestResult:  # fmt: skip
    return RequestResult(ok=True, prompt_len=prompt_len, output_len=output_len, ttft=ttft,
                         e2e=e2e, itls=itls or [])  # fmt: skip


def test_latency_percentiles_of_known_values() -> None:
    # 1..100 ms: numpy's linear interpolation gives p50 = 50.5, p90 = 90.1, p99 = 99.01.
    stats = serving.latency_stats_ms([i / 1000 for i in range(1, 101)])
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    empty = serving.latency_stats_ms([])
    assert all(math.isnan(v) for v in empty.values())


def test_tpot_is_the_mean_gap_after_the_first_token() -> None:
    assert result(0.1, 0.5, 5).tpot == pytest.approx(0.1)  # 4 gaps over 0.4 s
    assert result(0.1, 0.1, 1).tpot is None


def test_summary_throughput_and_goodput() -> None:
    results = [
        result(0.10, 1.00, 10, [0.1] * 9),  # TPOT 0.1: misses a 50 ms ITL SLO
        result(0.20, 0.38, 10, [0.02] * 9),  # TPOT 0.02, TTFT 200 ms: meets both
        result(0.60, 0.78, 10, [0.02] * 9),  # TTFT 600 ms: misses a 500 ms TTFT SLO
        result(0.05, 0.05, 1),  # one token: no TPOT, so the ITL SLO cannot fail it
        RequestResult(ok=False, error="HTTP 429: busy"),
    ]
    summary = serving.summarize(results, 2.0, SLO(ttft=0.5, itl=0.05))
    assert summary["completed"] == 4 and summary["failed"] == 1
    assert summary["output_tokens"] == 31 and summary["input_tokens"] == 40
    assert summary["request_throughput"] == pytest.approx(2.0)
    assert summary["output_throughput"] == pytest.approx(15.5)
    assert summary["total_token_throughput"] == pytest.approx(35.5)
    assert summary["good_requests"] == 2
    assert summary["goodput"] == pytest.approx(1.0)
    assert summary["slo_attainment"] == pytest.approx(0.4)  # failed requests count as misses
    assert summary["errors"] == ["HTTP 429: busy"]
    # ITL pools every gap of every successful request: 9 of 100 ms, 18 of 20 ms.
    assert summary["itl_ms"]["p50"] == pytest.approx(20.0)
    assert summary["itl_ms"]["p99"] == pytest.approx(100.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(150.0)
    # No SLO: every successful request is good.
    assert serving.summarize(results, 2.0, SLO())["good_requests"] == 4
    assert serving.summarize(results, 2.0, SLO(e2e=0.5))["good_requests"] == 2


def test_slo_and_duration_are_checked() -> None:
    with pytest.raises(ValueError, match="ttft SLO must be > 0"):
        SLO(ttft=0)
    with pytest.raises(ValueError, match="duration must be > 0"):
        serving.summarize([], 0.0, SLO())


def test_poisson_arrivals_are_seeded_and_at_the_rate() -> None:
    times = serving.arrival_times(20_000, 50.0, np.random.default_rng(1))
    assert times[0] == 0.0 and times == sorted(times)
    assert 20_000 / times[-1] == pytest.approx(50.0, rel=0.03)
    assert times == serving.arrival_times(20_000, 50.0, np.random.default_rng(1))
    assert serving.arrival_times(3, math.inf, np.random.default_rng(1)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="must be > 0"):
        serving.arrival_times(3, 0.0, np.random.default_rng(1))


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return serving.load_tokenizer(str(default_model_dir()))


def test_random_dataset_is_seeded_with_lengths_in_range(tokenizer: object) -> None:
    def make(seed: int) -> list[serving.BenchRequest]:
        source = TextSource(tokenizer, np.random.default_rng(seed))
        return serving.random_dataset(source, 30, 40, 12, 0.5)

    first = make(7)
    assert first == make(7) and first != make(8)
    # Each rate's run draws its own prompts from the one seeded source (none repeats the
    # last run's, which the server's prefix cache would hold), the same ones every time.
    args = serving.parse_args(["--num-prompts", "4", "--random-input-len", "16"])
    runs = [serving.build_dataset(args, TextSource(tokenizer, np.random.default_rng(3)))
            for _ in range(2)]  # fmt: skip
    source = TextSource(tokenizer, np.random.default_rng(3))
    one, two = serving.build_dataset(args, source), serving.build_dataset(args, source)
    assert one == runs[0] == runs[1] and not {r.prompt for r in one} & {r.prompt for r in two}
    for req in first:
        assert not req.is_chat and req.prompt
        assert 20 <= req.prompt_len <= 40  # the drawn tokens re-encode to about as many
        assert 6 <= req.output_len <= 12


def test_shared_prefix_chat_turns_extend_each_other(tokenizer: object) -> None:
    source = TextSource(tokenizer, np.random.default_rng(0))
    reqs = serving.shared_prefix_chat_dataset(source, 4, 3, 2, 30, 8, 5)
    assert len(reqs) == 12 and all(r.is_chat and r.output_len == 5 for r in reqs)
    # Turn t of conversation c is request t * 4 + c; its messages extend turn t-1's.
    for c in range(4):
        turns = [reqs[t * 4 + c].messages or () for t in range(3)]
        for t in (1, 2):
            assert turns[t][: len(turns[t - 1])] == turns[t - 1]
            assert len(turns[t]) == len(turns[t - 1]) + 2  # an assistant reply, a user turn
        assert [m["role"] for m in turns[0]] == ["system", "user"]
    systems = {(r.messages or ())[0]["content"] for r in reqs}
    assert len(systems) == 2  # one system prompt per group
    assert (reqs[0].messages or ())[0] == (reqs[2].messages or ())[0]  # conversations 0, 2


def test_bad_flags_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in (
        (["--request-rates", "0"], "request rate must be > 0"),
        (["--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["--random-range-ratio", "2"], "--random-range-ratio must be in [0, 1]"),
        (["--slo-ttft-ms", "-1"], "--slo-ttft-ms must be > 0"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    ):
        with pytest.raises(SystemExit):
            serving.parse_args(argv)
        assert needle in capsys.readouterr().err


def test_no_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2",
            "--random-input-len", "8", "--random-output-len", "2", "--disable-tqdm"]  # fmt: skip
    assert serving.main(argv) == 1
    assert "is a server at http://127.0.0.1:" in capsys.readouterr().err


def test_table_and_plot_from_summaries(tmp_path: Path) -> None:
    results = [result(0.1, 0.3, 5, [0.05] * 4), result(0.2, 0.4, 5, [0.05] * 4)]
    runs = []
    for rate in (2.0, math.inf):
        run = serving.summarize(results, 1.0, SLO(ttft=0.15))
        timings = [{"ttft": r.ttft, "e2e": r.e2e, "itls": r.itls} for r in results]
        run.update(request_rate=rate, max_concurrency=None, requests=timings)
        runs.append(run)
    table = serving.format_table(runs).splitlines()
    assert len(table) == 3 and "TTFT p99" in table[0]
    assert table[2].split()[:7] == ["inf", "-", "2/0", "2.00", "10.0", "1.00", "50"]
    pytest.importorskip("matplotlib")
    assert serving.plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_against_pdserve_local(tmp_path: Path) -> None:
    """A few seconds of real load through router, prefill, KV hand-off and decode."""
    spec = LocalClusterSpec(model_path=str(default_model_dir()), port=0,
                            engine_args=WORKER_FLAGS, log_dir=str(tmp_path / "logs"))  # fmt: skip
    out = tmp_path / "serving.json"
    with LocalCluster(spec) as cluster:
        argv = ["--base-url", cluster.url, "--num-prompts", "6", "--random-input-len", "24",
                "--random-output-len", "5", "--random-range-ratio", "1", "--request-rates",
                "20", "inf", "--slo-ttft-ms", "60000", "--output-file", str(out),
                "--disable-tqdm"]  # fmt: skip
        assert serving.main(argv) == 0
        chat = tmp_path / "chat.json"
        argv = ["--base-url", cluster.url, "--dataset", "shared-prefix-chat",
                "--num-conversations", "2", "--num-turns", "2", "--system-prompt-len", "30",
                "--turn-input-len", "6", "--turn-output-len", "4", "--max-concurrency", "2",
                "--output-file", str(chat), "--disable-tqdm", "--warmup-requests", "0"]  # fmt: skip
        assert serving.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["request_rate"] for r in report["runs"]] == [20.0, "inf"]
    for run in report["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0
        # ignore_eos and the server's usage: exactly the asked-for tokens.
        assert all(r["output_len"] == 5 and len(r["itls"]) <= 4 for r in run["requests"])
        # Every chunk placed in time (from its request's send) and counted.
        for r in run["requests"]:
            assert 0 <= r["sent"] < run["duration_s"]
            assert len(r["chunk_tokens"]) == len(r["itls"]) + 1 and min(r["chunk_tokens"]) >= 1
        assert run["output_tokens"] == 30 and run["good_requests"] == 6
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"] < run["e2e_ms"]["p99"]
    chat_run = json.loads(chat.read_text())["runs"][0]
    assert chat_run["completed"] == 4 and chat_run["output_tokens"] == 16
