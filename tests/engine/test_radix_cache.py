import random

import pytest

from engine.page_pool import PagePool
from engine.radix_cache import InsertResult, RadixCache, RadixNode

PAGE_SIZES = [1, 4]
NUM_PAGES = 64


def toks(page_size: int, labels: list[int]) -> list[int]:
    """Tokens for pages labelled `labels`; page `label` holds `label*10, label*10 + 1, ...`."""
    return [label * 10 + j for label in labels for j in range(page_size)]


def put(cache: RadixCache, pool: PagePool, labels: list[int]) -> InsertResult:
    """Insert like a scheduler does: allocate pages, insert, free the ones the tree did not take."""
    pages = pool.alloc(len(labels))
    assert pages is not None
    result = cache.insert(toks(cache.page_size, labels), pages)
    pool.free(pages[: result.num_existing_pages])
    return result


def tree_nodes(cache: RadixCache) -> list[RadixNode]:
    nodes, stack = [], list(cache._root.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes


def check_invariants(cache: RadixCache, pool: PagePool) -> None:
    """Every page is free in the pool or owned by exactly one node; all counts balance."""
    ps = cache.page_size
    owned: list[int] = []
    evictable = protected = 0
    for node in tree_nodes(cache):
        assert node.pages and len(node.key) == len(node.pages) * ps
        parent = node.parent
        assert parent is not None and parent.children[node.key[:ps]] is node
        assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()) >= 0
        owned.extend(node.pages)
        if node.lock_ref:
            protected += len(node.pages)
        else:
            evictable += len(node.pages)
    assert len(owned) == len(set(owned))
    assert all(pool.is_allocated(p) for p in owned)
    assert (cache.evictable_pages, cache.protected_pages) == (evictable, protected)
    assert cache.evictable_pages + cache.protected_pages == cache.total_pages == len(owned)
    assert cache.total_pages + pool.num_free == pool.num_pages


@pytest.fixture(params=PAGE_SIZES, ids=lambda ps: f"page_size={ps}")
def page_size(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def pool() -> PagePool:
    return PagePool(NUM_PAGES)


@pytest.fixture
def cache(page_size: int, pool: PagePool) -> RadixCache:
    return RadixCache(page_size, pool.free)


def test_rejects_bad_page_size() -> None:
    with pytest.raises(ValueError, match="page_size"):
        RadixCache(0, lambda pages: None)


def test_match_on_empty_tree(cache: RadixCache, pool: PagePool) -> None:
    result = cache.match_prefix(toks(cache.page_size, [1, 2]))
    assert result.pages == () and result.num_tokens == 0
    cache.lock(result.node)  # the root: a no-op
    cache.unlock(result.node)
    assert cache.total_pages == 0
    check_invariants(cache, pool)


def test_insert_then_match_full(cache: RadixCache, pool: PagePool) -> None:
    ins = put(cache, pool, [1, 2, 3])
    assert ins.num_existing_pages == 0 and len(ins.pages) == 3
    m = cache.match_prefix(toks(cache.page_size, [1, 2, 3]))
    assert m.pages == ins.pages and m.node is ins.node
    assert m.num_tokens == 3 * cache.page_size
    check_invariants(cache, pool)


def test_tokens_beyond_last_full_page_are_ignored(cache: RadixCache, pool: PagePool) -> None:
    ins = put(cache, pool, [1, 2])
    ps = cache.page_size
    query = toks(ps, [1, 2]) + toks(ps, [3])[: max(ps - 1, 1)]
    m = cache.match_prefix(query)
    assert m.pages == ins.pages and m.node is ins.node
    assert cache.match_prefix(toks(ps, [1])[: ps - 1]).pages == ()
    check_invariants(cache, pool)


def test_partial_match_splits_at_page_boundary(cache: RadixCache, pool: PagePool) -> None:
    ps = cache.page_size
    ins = put(cache, pool, [1, 2, 3, 4])
    assert len(tree_nodes(cache)) == 1
    # Diverges on the third page's last token: only two whole pages match.
    query = toks(ps, [1, 2, 3, 4])
    query[3 * ps - 1] = -1
    m = cache.match_prefix(query)
    assert m.pages == ins.pages[:2]
    assert m.node.key == tuple(toks(ps, [1, 2])) and m.node.pages == ins.pages[:2]
    assert len(tree_nodes(cache)) == 2
    # The original handle is now the lower part and still ends at the full key.
    assert ins.node.parent is m.node and ins.node.pages == ins.pages[2:]
    full = cache.match_prefix(toks(ps, [1, 2, 3, 4]))
    assert full.pages == ins.pages and full.node is ins.node
    check_invariants(cache, pool)


def test_peek_matches_what_match_would_and_changes_nothing(
    cache: RadixCache, pool: PagePool
) -> None:
    ps = cache.page_size
    put(cache, pool, [1, 2, 3, 4])
    put(cache, pool, [1, 2, 5])
    diverging = toks(ps, [1, 2, 3, 4])
    diverging[3 * ps - 1] = -1  # inside the third page
    queries = [toks(ps, [1, 2, 3, 4, 6]), toks(ps, [1, 2, 5]), diverging, toks(ps, [7]), []]
    queries.append(toks(ps, [1, 2, 3])[: 3 * ps - 1])  # a part page at the end
    before = [(n.key, n.pages, n.last_access) for n in tree_nodes(cache)]
    counters = (cache.hit_tokens, cache.query_tokens, cache._clock)
    peeked = [cache.peek_prefix_len(q) for q in queries]
    assert [(n.key, n.pages, n.last_access) for n in tree_nodes(cache)] == before
    assert (cache.hit_tokens, cache.query_tokens, cache._clock) == counters
    assert peeked == [4 * ps, 3 * ps, 2 * ps, 0, 0, 2 * ps]
    assert peeked == [cache.match_prefix(q).num_tokens for q in queries]
    check_invariants(cache, pool)


def test_short_query_splits_node(cache: RadixCache, pool: PagePool) -> None:
    ins = put(cache, pool, [1, 2, 3])
    m = cache.match_prefix(toks(cache.page_size, [1]))
    assert m.pages == ins.pages[:1]
    assert [len(n.pages) for n in tree_nodes(cache)] == [1, 2]
    check_invariants(cache, pool)


def test_insert_shared_prefix(cache: RadixCache, pool: PagePool) -> None:
    a = put(cache, pool, [1, 2, 3])
    free_before = pool.num_free
    b = put(cache, pool, [1, 2, 5, 6])
    assert b.num_existing_pages == 2
    assert b.pages[:2] == a.pages[:2] and len(set(b.pages)) == 4
    assert pool.num_free == free_before - 2  # only the two new pages were taken
    assert cache.total_pages == 5
    assert cache.match_prefix(toks(cache.page_size, [1, 2, 5, 6])).pages == b.pages
    assert cache.match_prefix(toks(cache.page_size, [1, 2, 3])).pages == a.pages
    check_invariants(cache, pool)


def test_insert_existing_key_and_prefix(cache: RadixCache, pool: PagePool) -> None:
    a = put(cache, pool, [1, 2, 3])
    again = put(cache, pool, [1, 2, 3])
    assert again.num_existing_pages == 3 and again.pages == a.pages and again.node is a.node
    prefix = put(cache, pool, [1, 2])
    assert prefix.num_existing_pages == 2 and prefix.pages == a.pages[:2]
    assert a.node.parent is prefix.node
    assert cache.total_pages == 3
    empty = cache.insert([], [])
    assert empty.num_existing_pages == 0 and empty.pages == ()
    check_invariants(cache, pool)


def test_insert_diverging_inside_a_page(cache: RadixCache, pool: PagePool) -> None:
    ps = cache.page_size
    a = put(cache, pool, [1, 2])
    tokens = toks(ps, [1, 2])
    tokens[-1] = -7
    pages = pool.alloc(2)
    assert pages is not None
    b = cache.insert(tokens, pages)
    pool.free(pages[: b.num_existing_pages])
    assert b.num_existing_pages == 1
    assert b.pages == (a.pages[0], pages[1])
    check_invariants(cache, pool)


def test_insert_validation(cache: RadixCache) -> None:
    ps = cache.page_size
    with pytest.raises(ValueError, match="do not fill"):
        cache.insert([*toks(ps, [1, 2]), 99], [0, 1])
    with pytest.raises(ValueError, match="do not fill"):
        cache.insert(toks(ps, [1]), [0, 1])
    with pytest.raises(ValueError, match="duplicate"):
        cache.insert(toks(ps, [1, 2]), [5, 5])
    assert cache.total_pages == 0


def test_insert_does_not_touch_hit_counters(cache: RadixCache, pool: PagePool) -> None:
    put(cache, pool, [1, 2])
    assert (cache.hit_tokens, cache.query_tokens, cache.hit_rate) == (0, 0, 0.0)


def test_hit_counters(cache: RadixCache, pool: PagePool) -> None:
    ps = cache.page_size
    put(cache, pool, [1, 2])
    cache.match_prefix(toks(ps, [1, 2, 3, 4]))  # 2 of 4 pages hit
    cache.match_prefix(toks(ps, [9, 9]))  # miss
    assert cache.query_tokens == 6 * ps and cache.hit_tokens == 2 * ps
    assert cache.hit_rate == pytest.approx(1 / 3)
    cache.match_prefix([*toks(ps, [1, 2]), 5])  # the partial page counts as queried
    assert cache.query_tokens == 8 * ps + 1 and cache.hit_tokens == 4 * ps


def test_lock_protects_and_unlock_releases(cache: RadixCache, pool: PagePool) -> None:
    ins = put(cache, pool, [1, 2, 3])
    cache.lock(ins.node)
    assert (cache.protected_pages, cache.evictable_pages) == (3, 0)
    check_invariants(cache, pool)
    assert cache.evict(100) == 0
    assert cache.match_prefix(toks(cache.page_size, [1, 2, 3])).pages == ins.pages
    cache.unlock(ins.node)
    assert (cache.protected_pages, cache.evictable_pages) == (0, 3)
    assert cache.evict(100) == 3
    assert pool.num_free == NUM_PAGES
    check_invariants(cache, pool)


def test_lock_covers_ancestors_only(cache: RadixCache, pool: PagePool) -> None:
    a = put(cache, pool, [1, 2, 3])
    b = put(cache, pool, [1, 2, 5, 6])
    cache.lock(b.node)
    assert (cache.protected_pages, cache.evictable_pages) == (4, 1)
    check_invariants(cache, pool)
    assert cache.evict(100) == 1  # only [3], the unlocked sibling leaf
    assert not pool.is_allocated(a.pages[2])
    assert cache.match_prefix(toks(cache.page_size, [1, 2, 5, 6])).pages == b.pages
    cache.unlock(b.node)
    check_invariants(cache, pool)


def test_nested_locks_and_unlock_below_zero(cache: RadixCache, pool: PagePool) -> None:
    ins = put(cache, pool, [1, 2])
    cache.lock(ins.node)
    cache.lock(ins.node)
    cache.unlock(ins.node)
    assert cache.protected_pages == 2
    cache.unlock(ins.node)
    assert cache.protected_pages == 0
    with pytest.raises(ValueError, match="no lock"):
        cache.unlock(ins.node)
    check_invariants(cache, pool)


def test_lock_survives_split(cache: RadixCache, pool: PagePool) -> None:
    ins = put(cache, pool, [1, 2, 3])
    cache.lock(ins.node)
    m = cache.match_prefix(toks(cache.page_size, [1, 2]))  # splits the locked node
    assert m.node.lock_ref == 1 and cache.protected_pages == 3
    check_invariants(cache, pool)
    cache.unlock(ins.node)
    assert (cache.protected_pages, cache.evictable_pages) == (0, 3)
    check_invariants(cache, pool)


def test_evicted_handle_cannot_be_locked(cache: RadixCache, pool: PagePool) -> None:
    ins = put(cache, pool, [1])
    cache.evict(1)
    with pytest.raises(ValueError, match="no longer in the tree"):
        cache.lock(ins.node)
    check_invariants(cache, pool)


def test_evict_is_lru_over_leaves(cache: RadixCache, pool: PagePool) -> None:
    ps = cache.page_size
    x = put(cache, pool, [1, 1])
    y = put(cache, pool, [2, 2])
    z = put(cache, pool, [3, 3])
    cache.match_prefix(toks(ps, [1, 1]))  # x becomes the most recent
    assert cache.evict(1) == 2  # leaves go whole
    assert not pool.is_allocated(y.pages[0]) and cache.total_pages == 4
    assert cache.evict(2) == 2
    assert not pool.is_allocated(z.pages[0]) and pool.is_allocated(x.pages[0])
    assert cache.evict(1) == 2
    assert cache.evict(1) == 0
    assert pool.num_free == NUM_PAGES
    check_invariants(cache, pool)


def test_evict_cascades_to_parents(cache: RadixCache, pool: PagePool) -> None:
    ps = cache.page_size
    put(cache, pool, [1, 2])
    put(cache, pool, [1, 2, 3])  # tree: [1, 2] -> [3]
    q = put(cache, pool, [7])
    assert cache.evict(1) == 1  # leaf [3] is the oldest leaf
    check_invariants(cache, pool)
    # [1, 2] is now a leaf, older than [7]: it goes first.
    assert cache.evict(1) == 2
    assert cache.match_prefix(toks(ps, [1])).pages == ()
    assert cache.match_prefix(toks(ps, [7])).pages == q.pages
    check_invariants(cache, pool)


def test_evict_cascade_in_one_call(cache: RadixCache, pool: PagePool) -> None:
    put(cache, pool, [1, 2, 3])
    put(cache, pool, [1, 2, 4])  # tree: [1, 2] -> {[3], [4]}
    assert cache.evict(3) == 4  # both leaves, then their parent
    assert cache.total_pages == 0 and pool.num_free == NUM_PAGES
    check_invariants(cache, pool)


def test_evict_argument_checks(cache: RadixCache, pool: PagePool) -> None:
    put(cache, pool, [1])
    assert cache.evict(0) == 0
    with pytest.raises(ValueError, match="negative"):
        cache.evict(-1)
    assert cache.total_pages == 1


def test_reset_frees_everything_once(page_size: int, pool: PagePool) -> None:
    freed: list[int] = []

    def free_pages(pages: list[int]) -> None:
        freed.extend(pages)
        pool.free(pages)

    cache = RadixCache(page_size, free_pages)
    a = put(cache, pool, [1, 2, 3])
    put(cache, pool, [1, 2, 5])
    put(cache, pool, [4])
    cache.match_prefix(toks(cache.page_size, [1]))  # one more split
    cache.lock(a.node)
    with pytest.raises(ValueError, match="locked"):
        cache.reset()
    cache.unlock(a.node)
    held = sorted(p for node in tree_nodes(cache) for p in node.pages)
    assert len(held) == 5
    cache.reset()
    assert sorted(freed) == held
    assert pool.num_free == NUM_PAGES
    assert cache.total_pages == cache.evictable_pages == cache.protected_pages == 0
    with pytest.raises(ValueError, match="no longer in the tree"):
        cache.lock(a.node)
    assert cache.match_prefix(toks(cache.page_size, [1, 2, 3])).pages == ()
    cache.reset()  # empty: frees nothing
    assert len(freed) == 5
    put(cache, pool, [1, 2])  # still usable
    check_invariants(cache, pool)


@pytest.mark.parametrize("seed", range(4))
def test_randomized_against_reference(page_size: int, seed: int) -> None:
    rng = random.Random(seed)
    pool = PagePool(48)
    ps = page_size
    # Reference model: token prefix (whole pages) -> the page backing its last page.
    page_of: dict[tuple[int, ...], int] = {}
    prefix_of: dict[int, tuple[int, ...]] = {}

    def free_pages(pages: list[int]) -> None:
        pool.free(pages)
        for page in pages:
            del page_of[prefix_of.pop(page)]

    cache = RadixCache(ps, free_pages)
    locked: list[tuple[RadixNode, tuple[int, ...], tuple[int, ...]]] = []
    seen: list[list[int]] = [[]]

    def random_tokens() -> list[int]:
        base = rng.choice(seen)
        keep = rng.randint(0, len(base))
        extra = rng.randint(0, 3 * ps + ps - 1)
        return base[:keep] + [rng.randint(0, 1) for _ in range(extra)]

    def expected_match(tokens: list[int]) -> tuple[int, ...]:
        pages: list[int] = []
        while (n := (len(pages) + 1) * ps) <= len(tokens) and tuple(tokens[:n]) in page_of:
            pages.append(page_of[tuple(tokens[:n])])
        return tuple(pages)

    for _ in range(300):
        op = rng.random()
        if op < 0.35:
            tokens = random_tokens()
            tokens = tokens[: len(tokens) // ps * ps]
            n = len(tokens) // ps
            pages = pool.alloc(n)
            if pages is None:
                cache.evict(n - pool.num_free)
                pages = pool.alloc(n)
            if pages is None:
                continue  # too much is locked
            want = expected_match(tokens)
            result = cache.insert(tokens, pages)
            assert result.num_existing_pages == len(want)
            assert result.pages == want + tuple(pages[len(want) :])
            pool.free(pages[: len(want)])
            for i in range(len(want), n):
                key = tuple(tokens[: (i + 1) * ps])
                page_of[key], prefix_of[pages[i]] = pages[i], key
            seen.append(tokens)
        elif op < 0.65:
            tokens = random_tokens()
            m = cache.match_prefix(tokens)
            assert m.pages == expected_match(tokens)
            if rng.random() < 0.5:
                cache.lock(m.node)
                locked.append((m.node, m.pages, tuple(tokens[: m.num_tokens])))
        elif op < 0.8 and locked:
            node, _, _ = locked.pop(rng.randrange(len(locked)))
            cache.unlock(node)
        elif op < 0.98:
            cache.evict(rng.randint(0, 8))
        elif not locked:
            cache.reset()
            assert pool.num_free == pool.num_pages and not page_of
        for _, pages_held, prefix in locked:  # locked pages never move
            assert expected_match(list(prefix)) == pages_held
        check_invariants(cache, pool)
        assert cache.total_pages == len(page_of)

    for node, _, _ in locked:
        cache.unlock(node)
    assert cache.protected_pages == 0
    cache.reset()
    assert pool.num_free == pool.num_pages
    check_invariants(cache, pool)


def _common_prefix_len_reference(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_common_prefix_len_matches_a_token_by_token_compare() -> None:
    """The slice-bisection compare against the plain loop: every position of a first
    difference, equal sequences, one a prefix of the other, empty ones (fuzzed)."""
    from engine.radix_cache import _common_prefix_len

    rng = random.Random(0)
    cases: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((), ()), ((), (1,)), ((1,), ())]
    for n in (1, 2, 3, 7, 16, 128, 129):
        base = tuple(rng.randrange(4) for _ in range(n))
        cases += [(base, base), (base, base[: n // 2]), (base[: n // 2], base)]
        for i in range(n):  # a difference at every position, the tails differing or not
            changed = (*base[:i], base[i] + 1, *base[i + 1 :])
            cases += [(base, changed), (changed, base), (base, changed[: i + 1])]
    for _ in range(2000):  # small alphabets: long shared runs and differences at random
        a = tuple(rng.randrange(2) for _ in range(rng.randrange(40)))
        b = tuple(rng.randrange(2) for _ in range(rng.randrange(40)))
        cases.append((a, b))
    for a, b in cases:
        assert _common_prefix_len(a, b) == _common_prefix_len_reference(a, b), (a, b)


def test_touch_refreshes_a_path_and_refuses_a_stale_handle(
    cache: RadixCache, pool: PagePool
) -> None:
    x = put(cache, pool, [1, 2])
    put(cache, pool, [3])
    cache.touch(x.node)  # x's path is now the most recent: [3] goes first
    assert cache.evict(1) == 1
    assert cache.match_prefix(toks(cache.page_size, [3])).pages == ()
    assert cache.evict(1) == 2
    with pytest.raises(ValueError, match="no longer in the tree"):
        cache.touch(x.node)
    check_invariants(cache, pool)
