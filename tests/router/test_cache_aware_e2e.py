"""Cache-aware routing against round robin, measured on real workers: 2 prefill + 1 decode.

A bounded multi-turn workload (7 conversations of 4 turns, run concurrently with random
pauses between turns; each turn's prompt is the previous prompt + the reply + new user
tokens) goes through the router once per prefill policy, on freshly started workers. Each
reply's ``usage`` says how many prompt tokens the prefill worker found in its radix cache
(``prompt_tokens_details.cached_tokens``; in disaggregated mode the router reports the
prefill worker's count). Prefill computed = prompt - cached. Cache-aware routing keeps a
conversation on the worker that has its prefix, so it must compute clearly fewer tokens than
round robin. ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import workers
from tests.router.test_e2e import Process

MODEL = "qwen3"
# Odd, so that round robin cannot look cache-aware by timing: with an even count and the
# conversations in near lock step (their turns take about as long), round robin sends every
# turn of a conversation to the same one of the 2 workers. With an odd count, lock step sends
# consecutive turns to alternate workers, and shuffled turns land at random: either way round
# robin misses about half its conversations' prefixes or more.
CONVERSATIONS = 7
TURNS = 4
SYSTEM_TOKENS = 16  # shared by every conversation
FIRST_USER_TOKENS = 256  # a document to discuss, say
USER_TOKENS = 24  # each later turn: a short follow-up question
# Long replies: in disaggregated mode the cached count comes from the prefill worker's reply,
# which can land after a short decode has already finished; the router then reports the
# decode worker's count (0). 96 decode steps leave the prefill reply time to arrive; the
# "later turns with 0 cached" column shows when it did not.
REPLY_TOKENS = 96
THINK_S = 0.2  # a user's pause before each turn: uniform in [0, THINK_S)


@dataclass
class Figures:
    policy: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    uncached_followups: int = 0  # later turns that report no cached token at all
    per_worker: str = ""

    @property
    def computed(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.testing.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("cache-aware-models"), [MODEL])[MODEL]


@contextlib.contextmanager
def cluster(model_dir: Path, policy: str, log_dir: Path) -> Iterator[str]:
    """Fresh workers (empty prefix caches) and a router routing prefill by ``policy``."""
    room = ("--max-total-tokens", "16384")  # every conversation fits in every pool
    with contextlib.ExitStack() as stack:
        specs = [("prefill", *room), ("prefill", *room), ("decode", *room)]
        *prefill, decode = [
            e for _, e in stack.enter_context(workers(model_dir, *specs, log_dir=log_dir))
        ]
        router = Process(
            ["router", "--model-path", str(model_dir), "--prefill", *prefill,
             "--decode", decode, "--prefill-policy", policy, "--decode-policy", "round_robin",
             "--port", "0"]
        )  # fmt: skip
        stack.callback(router.stop)
        yield str(router.wait_ready().ready["url"])


async def conversation(
    http: aiohttp.ClientSession, url: str, system: list[int], rng: random.Random, fig: Figures
) -> None:
    prompt = system + [rng.randrange(10, 500) for _ in range(FIRST_USER_TOKENS)]
    for turn in range(TURNS):
        # Random pauses shuffle the order in which turns reach the router, as users do.
        await asyncio.sleep(rng.uniform(0, THINK_S))
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": REPLY_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        async with http.post(url + "/v1/completions", json=body) as resp:
            reply = await resp.json()
            assert resp.status == 200, reply
        usage = reply["usage"]
        assert usage["prompt_tokens"] == len(prompt)
        fig.requests += 1
        fig.prompt_tokens += usage["prompt_tokens"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        fig.cached_tokens += cached
        fig.uncached_followups += turn > 0 and cached == 0
        if turn + 1 < TURNS:
            # Stand-ins for the reply's tokens: the prefill worker never computed the reply
            # (decode did), so for its cache only the length matters.
            reply_ids = [rng.randrange(10, 500) for _ in range(REPLY_TOKENS)]
            prompt = prompt + reply_ids + [rng.randrange(10, 500) for _ in range(USER_TOKENS)]


async def workload(url: str, policy: str, seed: int) -> Figures:
    rng = random.Random(seed)
    system = [rng.randrange(10, 500) for _ in range(SYSTEM_TOKENS)]
    fig = Figures(policy)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(
            *(
                conversation(http, url, system, random.Random(rng.random()), fig)
                for _ in range(CONVERSATIONS)
            )
        )
        async with http.get(url + "/metrics") as resp:
            metrics = await resp.text()
    # Per prefill worker request counts, when the router exports its policy decisions.
    counts = re.findall(
        r'^pdserve:router_policy_decisions_total\{[^}]*role="prefill"[^}]*\} (\S+)$',
        metrics,
        re.M,
    )
    fig.per_worker = "/".join(str(int(float(c))) for c in counts) or "n/a"
    return fig


def test_cache_aware_computes_fewer_prefill_tokens_than_round_robin(
    model_dir: Path, tmp_path: Path
) -> None:
    results = []
    for policy in ("round_robin", "cache_aware"):
        with cluster(model_dir, policy, tmp_path) as url:
            # The same seed: the same conversations, token for token, under both policies.
            results.append(asyncio.run(workload(url, policy, seed=11)))
    rr, ca = results
    print()
    print(
        f"{CONVERSATIONS} conversations x {TURNS} turns, 2 prefill + 1 decode workers, "
        f"concurrent conversations"
    )
    print(
        "| prefill policy | requests | prompt tokens | cached | computed | later turns with "
        "0 cached | requests per prefill worker |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for f in results:
        print(
            f"| {f.policy} | {f.requests} | {f.prompt_tokens} | {f.cached_tokens} | "
            f"{f.computed} | {f.uncached_followups} | {f.per_worker} |"
        )
    lengths = [
        SYSTEM_TOKENS + FIRST_USER_TOKENS + t * (REPLY_TOKENS + USER_TOKENS) for t in range(TURNS)
    ]
    best = CONVERSATIONS * (SYSTEM_TOKENS + sum(lengths[:-1]))
    print(f"at best (each later turn finds its whole previous prompt) {best} tokens are cached")
    print(f"cache_aware computes {ca.computed / rr.computed:.0%} of round robin's prefill tokens")
    assert rr.prompt_tokens == ca.prompt_tokens == CONVERSATIONS * sum(lengths)
    assert ca.computed <= 0.8 * rr.computed
