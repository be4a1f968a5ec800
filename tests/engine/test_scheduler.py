"""The scheduler and page manager alone: no model, tokens supplied by the test."""

from __future__ import annotations

import time

import pytest

from engine.config import EngineConfig
from engine.page_manager import PageManager
from engine.page_pool import PagePool
from engine.radix_cache import RadixCache
from engine.sampler import SampleResult
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import FinishReason, SeqStatus, Sequence


def make_scheduler(
    num_pages: int = 32, page_size: int = 4, cache: bool = True, **kwargs: object
) -> Scheduler:
    pool = PagePool(num_pages)
    radix = RadixCache(page_size, pool.free) if cache else None
    config = EngineConfig(model_path="unused", page_size=page_size, **kwargs)  # type: ignore[arg-type]
    return Scheduler(config, PageManager(pool, radix, page_size), context_length=256)


def seq(rid: str, tokens: list[int], max_new: int = 4, **kwargs: object) -> Sequence:
    params = SamplingParams(temperature=0, max_new_tokens=max_new, **kwargs)  # type: ignore[arg-type]
    return Sequence(rid, list(tokens), len(tokens), params, eos_token_ids=frozenset({0}))


def run_step(s: Scheduler, token: int = 9) -> ScheduledBatch | None:
    batch = s.schedule()
    if batch is not None:
        n = len(batch.seqs)
        s.postprocess(batch, SampleResult([token] * n, [None] * n))
    return batch


def reclaimable(s: Scheduler) -> int:
    return s.pages.num_available


def test_prefill_then_decode_until_length() -> None:
    s = make_scheduler()
    a = seq("a", [1, 2, 3, 4, 5], max_new=3)
    s.add(a)
    batch = run_step(s)
    assert batch is not None and not batch.is_decode and batch.extend_lens == [5]
    assert a.status is SeqStatus.RUNNING and a.output_ids == [9]
    while s.has_unfinished():
        batch = run_step(s)
        assert batch is not None and batch.is_decode
    assert a.finish_reason is FinishReason.LENGTH and a.output_ids == [9, 9, 9]
    assert reclaimable(s) == 32


def test_eos_and_stop_tokens_finish() -> None:
    s = make_scheduler()
    a, b = (
        seq("a", [1, 2], max_new=10),
        seq("b", [3, 4], max_new=10, stop_token_ids=(7,), ignore_eos=True),
    )
    s.add(a)
    s.add(b)
    run_step(s, token=5)
    run_step(s, token=0)  # EOS finishes a; b ignores it until it sees its stop token
    assert a.finish_reason is FinishReason.STOP and b.status is SeqStatus.RUNNING
    run_step(s, token=7)
    assert b.finish_reason is FinishReason.STOP
    assert reclaimable(s) == 32


def test_chunked_prefill_splits_long_prompts() -> None:
    s = make_scheduler(chunked_prefill_size=4)
    a = seq("a", list(range(1, 11)))
    s.add(a)
    lens = []
    while a.num_output_tokens == 0:
        batch = run_step(s)
        assert batch is not None
        lens.append(batch.extend_lens[0])
    assert lens == [4, 4, 2]
    # The sample of a partial chunk is not a token.
    assert a.output_ids == [9]


def test_prefill_start_is_stamped_once_at_the_first_chunk() -> None:
    """The time a request's first prefill step is scheduled (servers split TTFT with it):
    set by the first chunk, kept by later chunks."""
    s = make_scheduler(chunked_prefill_size=4)
    a = seq("a", list(range(1, 11)))
    s.add(a)
    assert a.prefill_started_at is None
    before = time.monotonic()
    run_step(s)
    first = a.prefill_started_at
    assert first is not None and before <= first <= time.monotonic()
    while s.has_unfinished():
        run_step(s)
    assert a.prefill_started_at == first


def test_unchunked_long_prompt_runs_alone() -> None:
    s = make_scheduler(chunked_prefill_size=-1, max_prefill_tokens=8)
    s.add(seq("a", list(range(1, 13))))
    s.add(seq("b", [1, 2]))
    first = s.schedule()
    assert first is not None and first.extend_lens == [12]


def test_prefix_reuse_and_page_balance() -> None:
    s = make_scheduler(page_size=4)
    shared = list(range(1, 13))
    s.add(seq("a", [*shared, 50]))
    while s.has_unfinished():
        run_step(s)
    b = seq("b", [*shared, 60, 61])
    s.add(b)
    run_step(s)
    assert b.num_prefix_hit_tokens == 12
    while s.has_unfinished():
        run_step(s)
    assert reclaimable(s) == 32
    s.pages.cache.reset()  # type: ignore[union-attr]
    assert s.pages.pool.num_free == 32


def test_max_running_requests_caps_admission() -> None:
    s = make_scheduler(max_running_requests=2)
    for i in range(4):
        s.add(seq(f"r{i}", [1, 2, 3]))
    run_step(s)
    assert s.num_running == 2 and s.num_waiting == 2


def test_preemption_when_pages_run_out() -> None:
    s = make_scheduler(num_pages=6, page_size=2, cache=False)
    seqs = [seq(f"r{i}", [1, 2, 3], max_new=6) for i in range(3)]
    for x in seqs:
        s.add(x)
    started: dict[str, float] = {}
    for _ in range(200):
        if not s.has_unfinished():
            break
        run_step(s)
        for x in seqs:
            if x.request_id not in started and x.prefill_started_at is not None:
                started[x.request_id] = x.prefill_started_at
    assert s.num_preemptions > 0
    # A recompute after preemption keeps the first prefill's start time.
    assert all(started[x.request_id] == x.prefill_started_at for x in seqs)
    assert all(x.output_ids == [9] * 6 for x in seqs)
    assert s.pages.pool.num_free == 6


@pytest.mark.parametrize("stage", ["waiting", "mid_prefill", "running"])
def test_abort_frees_pages_at_every_stage(stage: str) -> None:
    s = make_scheduler(chunked_prefill_size=4)
    a = seq("a", list(range(1, 11)), max_new=20)
    s.add(a)
    if stage in ("mid_prefill", "running"):
        run_step(s)
    if stage == "running":
        run_step(s)
        run_step(s)
        assert a.status is SeqStatus.RUNNING
    assert s.abort("a") is a
    assert a.finish_reason is FinishReason.ABORT
    assert s.abort("a") is None
    assert not s.has_unfinished() and s.schedule() is None
    assert reclaimable(s) == 32


def test_abort_while_step_in_flight_drops_its_result() -> None:
    s = make_scheduler()
    a = seq("a", [1, 2, 3])
    s.add(a)
    batch = s.schedule()
    assert batch is not None
    s.abort("a")
    assert s.postprocess(batch, SampleResult([9], [None])) == []
    assert a.output_ids == [] and reclaimable(s) == 32


def test_bad_requests_are_refused_with_the_limit() -> None:
    s = make_scheduler(num_pages=4, page_size=4)
    with pytest.raises(ValueError, match="empty"):
        s.add(seq("e", []))
    with pytest.raises(ValueError, match="context length is 256"):
        s.add(seq("long", [1] * 256))
    with pytest.raises(ValueError, match="only 4 pages"):
        s.add(seq("big", [1] * 10, max_new=100))
    s.add(seq("ok", [1, 2]))
    with pytest.raises(ValueError, match="already in use"):
        s.add(seq("ok", [1, 2]))


def test_quarantined_transfer_keeps_its_pages_until_released() -> None:
    """A request given up on while a peer may still write its pages: the request id is free
    at once, the pages only on release (exactly once)."""
    s = make_scheduler(cache=False)
    pages = s.add_transferring(seq("q", list(range(1, 11))))
    assert s.quarantine("q", key=77)
    assert not s.has_unfinished() and "q" not in s.transferring
    assert s.pages.pool.num_free == 32 - len(pages)
    s.add_transferring(seq("q", list(range(1, 11))))  # the id may be used again
    assert s.pages.pool.num_free == 32 - 2 * len(pages)
    assert s.abort("q") is not None
    assert s.release_quarantined(77) and not s.release_quarantined(77)
    assert s.pages.pool.num_free == 32
    assert not s.quarantine("unknown", key=1)


@pytest.mark.parametrize("max_new", [1, 2, 6])
def test_finishing_frees_its_own_pages_and_caches_full_ones(max_new: int) -> None:
    """A request finishing within the page its prompt was cached to (1 or 2 new tokens after
    an 8-token prompt, pages of 4) takes the release path that inserts nothing; one that
    filled a page more (6) inserts it. Either way its own partial pages go back to the pool
    exactly once, its lock is gone, and the cached pages are the full computed ones."""
    s = make_scheduler(num_pages=32, page_size=4)
    a = seq("a", list(range(1, 9)), max_new=max_new)
    s.add(a)
    while s.has_unfinished():
        run_step(s)
    cache = s.pages.cache
    assert cache is not None
    full = (8 + max_new - 1) // 4  # the last token is never computed
    assert (cache.total_pages, cache.protected_pages) == (full, 0)
    assert s.pages.pool.num_free == 32 - full
    again = s.pages.cache.match_prefix([*range(1, 9), *[9] * max_new])  # type: ignore[union-attr]
    assert len(again.pages) == full


def test_a_finished_prefix_is_the_most_recently_used() -> None:
    """Finishing refreshes the LRU time of the request's cached prefix, on the release path
    that inserts nothing too: `a`, cached first at its prefill, finishes last (its second
    token, within its cached page), so `b`'s prefix, cached when `b` finished at its first
    token, is now the older one and is evicted first."""
    s = make_scheduler(num_pages=32, page_size=4)
    a, b = seq("a", [*range(1, 9)], max_new=2), seq("b", [*range(20, 28)], max_new=1)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: a's prompt cached, then b finishes and caches its own
    assert b.is_finished and not a.is_finished
    run_step(s)
    assert a.is_finished and a.num_cached_pages == 0
    cache = s.pages.cache
    assert cache is not None and cache.total_pages == 4
    assert cache.evict(1) == 2
    assert cache.match_prefix(list(range(20, 28))).pages == ()
    assert len(cache.match_prefix(list(range(1, 9))).pages) == 2
