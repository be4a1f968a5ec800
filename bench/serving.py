"""A serving benchmark: load on an OpenAI-compatible HTTP endpoint, latency and goodput out.

Works against pdserve's router and any other OpenAI-compatible server (vLLM, SGLang, ...). It
sends streamed requests (SSE), times every content chunk, and reports per offered load:

- time to first token (TTFT), inter-token latency (ITL: the gap between consecutive content
  chunks, pooled over all requests), time per output token (TPOT: a request's mean gap after
  its first token) and end-to-end latency (E2E), each at mean, p50, p90 and p99;
- request, output-token and total-token throughput over the run's wall time;
- goodput: requests per second that met every SLO given (`--slo-ttft-ms`, `--slo-itl-ms`
  checked against the request's TPOT, its mean ITL, and `--slo-e2e-ms`).

Datasets are generated from `--seed`, nothing is downloaded:

- `random`: prompts of random tokens, input and output lengths uniform in
  `[L * range_ratio, L]` (SGLang's `--random-range-ratio`), sent to /v1/completions;
- `shared-prefix-chat`: multi-turn conversations sent to /v1/chat/completions. Conversations in
  one group share a system prompt; turn k of a conversation repeats its turns 1..k-1 (user
  message plus a seeded assistant reply of the output length), so every request's prompt is a
  prefix-sharing extension of the one before it. The assistant replies are generated, not the
  server's, so each request is known in advance and the load schedule is independent of the
  server (as in SGLang's generated-shared-prefix set).

Load is a Poisson process at `--request-rate` (requests/s; `inf` sends all at once), optionally
capped at `--max-concurrency` requests in flight; `--request-rates 1 2 4 inf` runs several loads
in one go, each with prompts of its own (a repeat would hit the server's prefix cache).
Warm-up requests go first and are not counted. At the end: a table, a JSON file
(`--output-file`) and, with matplotlib installed (`pip install 'pdserve[bench]'`), a PNG of
the latency CDFs and of goodput against rate.

    pdserve local &                                  # the embedded tiny model on the CPU
    python -m bench.serving --num-prompts 50 --random-input-len 64 --random-output-len 16 \\
        --request-rates 1 2 4 inf --slo-ttft-ms 500 --slo-itl-ms 50
    python -m bench.serving --dataset shared-prefix-chat --num-conversations 16 --num-turns 4 \\
        --max-concurrency 8 --base-url http://gpu-host:8000 --tokenizer /models/Llama-3-8B
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm.asyncio import tqdm

PERCENTILES = (50, 90, 99)

# Called before each rate's run; the function it returns is called after that run, and the dict
# that returns joins the run's summary (e.g. the server's metrics, scraped around the run).
RunProbe = Callable[[], Callable[[], dict[str, Any]]]

# ---- datasets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRequest:
    """One request of a dataset: a completion prompt or chat messages, and how many tokens to
    ask for. `prompt_len` is the tokenizer's count (the server's `usage` wins when it sends
    one; a chat template adds a few tokens)."""

    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    prompt_len: int
    output_len: int

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


class TextSource:
    """Random text of a given token length from a tokenizer's plain vocabulary.

    Only tokens that decode to printable text and encode back to themselves are drawn, so
    that a prompt is readable and re-encodes to about as many tokens as were drawn."""

    def __init__(self, tokenizer: Any, rng: np.random.Generator) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        ids = list(range(tokenizer.get_vocab_size()))
        pieces = tokenizer.decode_batch([[i] for i in ids])  # batched: 128k+ for real models
        again = tokenizer.encode_batch(pieces, add_special_tokens=False)
        pool = [
            i
            for i, piece, enc in zip(ids, pieces, again, strict=True)
            if piece and piece.isprintable() and enc.ids == [i]
        ]
        if len(pool) < 16:
            raise ValueError(
                f"the tokenizer has only {len(pool)} plain printable tokens; pass --tokenizer "
                "with a real model's tokenizer"
            )
        self.pool = np.array(pool)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def counts(self, chunks: Sequence[str]) -> list[int]:
        """The tokens of each streamed chunk, counted in one batched call: at least 1 (a
        chunk carries a token, though its text alone may re-encode to none)."""
        encoded = self.tokenizer.encode_batch(list(chunks), add_special_tokens=False)
        return [max(1, len(e.ids)) for e in encoded]

    def text(self, num_tokens: int) -> str:
        """About `num_tokens` tokens of random text (exactly, where the pieces do not merge)."""
        if num_tokens <= 0:
            return ""
        ids = self.rng.choice(self.pool, size=num_tokens).tolist()
        text = self.tokenizer.decode(ids)
        # Re-encoding may merge pieces into fewer tokens or split into more: cut to length.
        again = self.tokenizer.encode(text, add_special_tokens=False).ids
        return str(self.tokenizer.decode(again[:num_tokens]))


def _lengths(rng: np.random.Generator, n: int, full: int, range_ratio: float) -> list[int]:
    low = max(1, int(full * range_ratio))
    return [int(x) for x in rng.integers(low, full + 1, size=n)]


def random_dataset(
    source: TextSource, num_prompts: int, input_len: int, output_len: int, range_ratio: float
) -> list[BenchRequest]:
    """`num_prompts` completion requests of random text; lengths uniform in
    `[L * range_ratio, L]`."""
    inputs = _lengths(source.rng, num_prompts, input_len, range_ratio)
    outputs = _lengths(source.rng, num_prompts, output_len, range_ratio)
    requests = []
    for n_in, n_out in zip(inputs, outputs, strict=True):
        prompt = source.text(n_in)
        requests.append(BenchRequest(prompt, None, source.count(prompt), n_out))
    return requests


def shared_prefix_chat_dataset(
    source: TextSource,
    num_conversations: int,
    num_turns: int,
    num_groups: int,
    system_prompt_len: int,
    turn_input_len: int,
    output_len: int,
) -> list[BenchRequest]:
    """`num_conversations * num_turns` chat requests, turn by turn: every conversation's turn 1,
    then every turn 2, and so on, so a turn is sent after the turn its prompt extends."""
    systems = [source.text(system_prompt_len) for _ in range(num_groups)]
    conversations: list[list[dict[str, str]]] = [
        [{"role": "system", "content": systems[c % num_groups]}] for c in range(num_conversations)
    ]
    requests = []
    for _turn in range(num_turns):
        for history in conversations:
            history.append({"role": "user", "content": source.text(turn_input_len)})
            prompt_len = sum(source.count(m["content"]) for m in history)
            requests.append(BenchRequest(None, tuple(dict(m) for m in history), prompt_len,
                                         output_len))  # fmt: skip
            # The reply the next turn carries in its history (generated, see the module doc).
            history.append({"role": "assistant", "content": source.text(output_len)})
    return requests


# ---- one request ---------------------------------------------------------------------------


@dataclass
class RequestResult:
    """Timings of one request, in seconds from when it was sent. `itls` are the gaps between
    consecutive content chunks; `output_len` is the server's `usage.completion_tokens` when
    it sends one, else the tokenizer's count of the text. `sent` is when it was sent, in
    seconds from the start of its run; `chunks` the text of each content chunk (a chunk may
    carry several tokens)."""

    ok: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""
    sent: float = 0.0
    chunks: list[str] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


def _chunk_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return str(choice["text"] or "")
    return str((choice.get("delta") or {}).get("content") or "")


async def send_request(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    req: BenchRequest,
    source: TextSource | None,
    ignore_eos: bool,
) -> RequestResult:
    """Send `req` streamed and time its chunks; never raises for a failed request (the result
    says `ok=False` and why)."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if req.is_chat:
        url = f"{base_url}/v1/chat/completions"
        body["messages"] = list(req.messages or ())
    else:
        url = f"{base_url}/v1/completions"
        body["prompt"] = req.prompt
    result = RequestResult(ok=False, prompt_len=req.prompt_len)
    text: list[str] = []
    usage: dict[str, Any] | None = None
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    result.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                piece = _chunk_text(event)
                if not piece:
                    continue  # a role-only first chat chunk, the usage chunk
                now = time.perf_counter()
                if not text:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                text.append(piece)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.chunks = text
    if not text:
        result.error = "the stream ended without any content"
        return result
    if usage is not None:
        result.prompt_len = int(usage.get("prompt_tokens", req.prompt_len))
        result.output_len = int(usage.get("completion_tokens", 0))
    elif source is not None:
        result.output_len = source.count("".join(text))
    else:
        result.output_len = len(text)  # one chunk per token, the best guess left
    result.ok = True
    return result


# ---- statistics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds; None: not checked."""

    ttft: float | None = None
    itl: float | None = None  # checked against a request's TPOT (its mean ITL)
    e2e: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft", "itl", "e2e"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"the {name} SLO must be > 0, got {value}")

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft is not None and r.ttft > self.ttft:
            return False
        tpot = r.tpot
        if self.itl is not None and tpot is not None and tpot > self.itl:
            return False
        return not (self.e2e is not None and r.e2e > self.e2e)


def latency_stats_ms(values_s: Sequence[float]) -> dict[str, float]:
    """Mean and p50/p90/p99 (linear interpolation) in milliseconds; NaN when empty."""
    if not values_s:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats = {"mean": float(ms.mean())}
    for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES), strict=True):
        stats[f"p{p}"] = float(v)
    return stats


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO) -> dict[str, Any]:
    """The figures of one run: counts, throughputs over `duration_s`, latency percentiles of
    the successful requests, and goodput (requests per second meeting `slo`)."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    good = sum(1 for r in ok if slo.met_by(r))
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "good_requests": good,
        "goodput": good / duration_s,
        "slo_attainment": good / len(results) if results else math.nan,
        "ttft_ms": latency_stats_ms([r.ttft for r in ok]),
        "itl_ms": latency_stats_ms([gap for r in ok for gap in r.itls]),
        "tpot_ms": latency_stats_ms(tpots),
        "e2e_ms": latency_stats_ms([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def arrival_times(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Send times (s from the start) of `n` requests of a Poisson process at `rate` req/s;
    all zero for an infinite rate. The first request goes at once."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (inf: all at once), got {rate}")
    if math.isinf(rate) or n == 0:
        return [0.0] * n
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return [float(t) for t in np.cumsum(gaps)]


# ---- a run ---------------------------------------------------------------------------------


async def run_load(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    model: str,
    requests: Sequence[BenchRequest],
    source: TextSource | None,
    rate: float,
) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time (at most `--max-concurrency` in flight); return
    the results in dataset order and the wall time from the first send to the last reply."""
    times = arrival_times(len(requests), rate, np.random.default_rng(args.seed))
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(requests), desc=f"rate {rate:g}", unit="req", disable=args.disable_tqdm)
    start = time.perf_counter()

    async def one(req: BenchRequest, at: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        async with limit or contextlib.nullcontext():
            sent = time.perf_counter() - start
            result = await send_request(session, args.base_url, model, req, source,
                                        not args.disable_ignore_eos)  # fmt: skip
        result.sent = sent
        bar.update(1)
        return result

    results = await asyncio.gather(*(one(r, t) for r, t in zip(requests, times, strict=True)))
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def _timings(r: RequestResult, source: TextSource | None) -> dict[str, Any]:
    """A request's figures for the JSON file: `sent` (s from the run's start) and `ttft`
    plus the running sum of `itls` place every chunk in time; `chunk_tokens` is the
    tokenizer's count of each chunk's text (at least 1: a chunk carries a token; exact for
    a word-level tokenizer, close for others: `output_len` is the server's count)."""
    counts = [1] * len(r.chunks) if source is None else source.counts(r.chunks)
    return {"prompt_len": r.prompt_len, "output_len": r.output_len, "sent": r.sent,
            "ttft": r.ttft, "e2e": r.e2e, "tpot": r.tpot, "itls": r.itls,
            "chunk_tokens": counts}  # fmt: skip


async def served_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model of GET /v1/models."""
    async with session.get(f"{base_url}/v1/models") as resp:
        if resp.status != 200:
            raise RuntimeError(
                f"GET {base_url}/v1/models answered {resp.status}; pass --model explicitly"
            )
        models = (await resp.json()).get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model explicitly")
    return str(models[0]["id"])


async def benchmark(
    args: argparse.Namespace,
    warmup: list[BenchRequest],
    datasets: list[list[BenchRequest]],
    source: TextSource | None,
    probe: RunProbe | None = None,
) -> list[dict[str, Any]]:
    """Send `warmup`, then run `datasets[i]` at `args.request_rates[i]`; the summaries, each
    with its per-request timings (and what `probe` adds)."""
    slo = SLO(*(None if v is None else v / 1000.0 for v in
                (args.slo_ttft_ms, args.slo_itl_ms, args.slo_e2e_ms)))  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)  # the concurrency cap is ours, not the pool's
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = args.model or await served_model(session, args.base_url)
        warm = [await send_request(session, args.base_url, model, r, source,
                                   not args.disable_ignore_eos) for r in warmup]  # fmt: skip
        failed = [w.error for w in warm if not w.ok]
        if failed:
            raise RuntimeError(f"warm-up request failed: {failed[0]}")
        runs = []
        for rate, requests in zip(args.request_rates, datasets, strict=True):
            finish = None if probe is None else await asyncio.to_thread(probe)
            results, duration = await run_load(session, args, model, requests, source, rate)
            summary = summarize(results, duration, slo)
            summary.update(
                request_rate=rate,
                max_concurrency=args.max_concurrency,
                requests=[_timings(r, source) for r in results if r.ok],
            )
            if finish is not None:
                summary.update(await asyncio.to_thread(finish))
            runs.append(summary)
    return runs


# ---- reporting -----------------------------------------------------------------------------


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run: load, counts, throughputs, goodput, latency percentiles (ms)."""
    header = ["rate", "conc", "ok/fail", "req/s", "out tok/s", "goodput", "SLO %"]
    for metric in ("TTFT", "ITL", "E2E"):
        header += [f"{metric} p{p}" for p in PERCENTILES]
    rows = [header]
    for run in runs:
        row = [
            f"{run['request_rate']:g}",
            str(run["max_concurrency"] or "-"),
            f"{run['completed']}/{run['failed']}",
            f"{run['request_throughput']:.2f}",
            f"{run['output_throughput']:.1f}",
            f"{run['goodput']:.2f}",
            f"{100 * run['slo_attainment']:.0f}",
        ]
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            row += [f"{run[key][f'p{p}']:.1f}" for p in PERCENTILES]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _rate_label(run: dict[str, Any]) -> str:
    conc = f", conc {run['max_concurrency']}" if run["max_concurrency"] else ""
    return f"rate {run['request_rate']:g}{conc}"


def plot(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    """Latency CDFs (one line per run) and goodput against rate, as a PNG at `path`. Returns
    False, with a message, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "no plot: matplotlib is not installed (pip install 'pdserve[bench]' or matplotlib); "
            "the table and the JSON file are complete without it",
            file=sys.stderr,
        )
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = (
        (axes[0][0], "TTFT (ms)", lambda rs: [r["ttft"] for r in rs]),
        (axes[0][1], "ITL (ms)", lambda rs: [g for r in rs for g in r["itls"]]),
        (axes[1][0], "E2E latency (ms)", lambda rs: [r["e2e"] for r in rs]),
    )
    for ax, title, values in panels:
        for run in runs:
            xs = np.sort(np.asarray(values(run["requests"]), dtype=np.float64) * 1000.0)
            if len(xs):
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), drawstyle="steps-post",
                        label=_rate_label(run))  # fmt: skip
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests" if "ITL" not in title else "fraction of gaps")
        ax.set_title(f"{title.split(' (')[0]} CDF")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[1][1]
    # An infinite offered rate is drawn at the rate it achieved.
    rates = [r["request_rate"] if math.isfinite(r["request_rate"]) else r["request_throughput"]
             for r in runs]  # fmt: skip
    order = np.argsort(rates)
    ax.plot([rates[i] for i in order], [runs[i]["goodput"] for i in order], "o-",
            label="goodput")  # fmt: skip
    ax.plot([rates[i] for i in order], [runs[i]["request_throughput"] for i in order], "s--",
            label="throughput")  # fmt: skip
    for x, run in zip(rates, runs, strict=True):
        if not math.isfinite(run["request_rate"]):
            ax.annotate("inf", (x, run["goodput"]))
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.set_title("goodput against rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---- command line --------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """`value` with non-finite floats made strict JSON: inf as "inf", NaN as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's root URL")
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    p.add_argument(
        "--tokenizer",
        help="a Hugging Face model dir or tokenizer.json for prompts and token counts "
        "(default: pdserve's embedded tiny model, what `pdserve local` serves)",
    )
    p.add_argument("--dataset", default="random", choices=["random", "shared-prefix-chat"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-prompts", type=int, default=100, help="random dataset size")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L * ratio, L]; 1: all of length L")  # fmt: skip
    p.add_argument("--num-conversations", type=int, default=16)
    p.add_argument("--num-turns", type=int, default=4)
    p.add_argument("--num-groups", type=int, default=4, help="system prompts shared by groups")
    p.add_argument("--system-prompt-len", type=int, default=256)
    p.add_argument("--turn-input-len", type=int, default=64)
    p.add_argument("--turn-output-len", type=int, default=32)
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--request-rate", type=_rate, default=math.inf,
                       help="Poisson arrivals, req/s (default inf: all at once)")  # fmt: skip
    rates.add_argument("--request-rates", type=_rate, nargs="+",
                       help="one run per rate, in order")  # fmt: skip
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="at most this many requests in flight (fixed concurrency with rate inf)",
    )
    p.add_argument("--warmup-requests", type=int, default=1, help="sent first, not counted")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--disable-ignore-eos", action="store_true",
                   help="do not send ignore_eos (for servers that reject it)")  # fmt: skip
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-itl-ms", type=float, help="checked against each request's TPOT")
    p.add_argument("--slo-e2e-ms", type=float)
    p.add_argument("--output-file", default="bench_serving.json", help="JSON results")
    p.add_argument("--plot-file", help="PNG of CDFs and goodput (default: output file's .png)")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked flags; a bad value exits with a message naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.request_rates = args.request_rates or [args.request_rate]
    positive = ("num_prompts", "random_input_len", "random_output_len", "num_conversations",
                "num_turns", "num_groups", "turn_input_len", "turn_output_len")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.system_prompt_len < 0 or args.warmup_requests < 0:
        parser.error("--system-prompt-len and --warmup-requests must be >= 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        parser.error(f"--random-range-ratio must be in [0, 1], got {args.random_range_ratio}")
    for name in ("slo_ttft_ms", "slo_itl_ms", "slo_e2e_ms", "request_timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    args.base_url = args.base_url.rstrip("/")
    return args


def load_tokenizer(path: str | None) -> Any:
    from tokenizers import Tokenizer

    if path is None:
        from engine.cli import default_model_dir

        path = str(default_model_dir())
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise SystemExit(f"error: no tokenizer at {file}; pass --tokenizer DIR/tokenizer.json")
    return Tokenizer.from_file(str(file))


def build_dataset(args: argparse.Namespace, source: TextSource) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_dataset(source, args.num_prompts, args.random_input_len,
                              args.random_output_len, args.random_range_ratio)  # fmt: skip
    return shared_prefix_chat_dataset(
        source, args.num_conversations, args.num_turns, args.num_groups,
        args.system_prompt_len, args.turn_input_len, args.turn_output_len,
    )  # fmt: skip


def main(argv: list[str] | None = None, probe: RunProbe | None = None) -> int:
    """The command line; `probe` (from Python) adds to each run's summary."""
    args = parse_args(argv)
    source = TextSource(load_tokenizer(args.tokenizer), np.random.default_rng(args.seed))
    # Fresh prompts for the warm-up and for each rate (all from --seed): a run that repeated
    # the last one's prompts would find them in the server's prefix cache.
    warmup = build_dataset(args, source)[: args.warmup_requests] if args.warmup_requests else []
    datasets = [build_dataset(args, source) for _ in args.request_rates]
    try:
        runs = asyncio.run(benchmark(args, warmup, datasets, source, probe))
    except (RuntimeError, aiohttp.ClientError, OSError) as exc:
        print(f"error: {exc} (is a server at {args.base_url}?)", file=sys.stderr)
        return 1
    print(format_table(runs))
    config = {k: v for k, v in vars(args).items() if k != "request_rate"}
    out = Path(args.output_file)
    out.write_text(json.dumps(_jsonable({"config": config, "runs": runs}), indent=1))
    plot_path = Path(args.plot_file) if args.plot_file else out.with_suffix(".png")
    plotted = plot(runs, plot_path)
    print(f"results: {out}" + (f", plot: {plot_path}" if plotted else ""))
    return 0 if all(r["failed"] == 0 for r in runs) else 2


if __name__ == "__main__":
    raise SystemExit(main())
